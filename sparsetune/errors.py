"""The one error type the CLI turns into a one-line message and exit code 2."""


class SparsetuneError(Exception):
    """Bad input or an impossible request. The message names the problem and the fix."""


def as_value_error(check, value):  # type: ignore[no-untyped-def]
    """Run `check(value)` inside a pydantic validator: our one-line error becomes a ValueError that pydantic
    reports with the field name (and a recipe, with the YAML line)."""
    try:
        return check(value)
    except SparsetuneError as err:
        raise ValueError(str(err)) from err
