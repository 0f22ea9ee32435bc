"""Tiny random configs of every decoder family the architecture test matrix covers (transformers 5.x)."""

from __future__ import annotations

import torch

COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=3,
)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)
FAMILY_CONFIGS: dict[str, dict] = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "gemma": {"head_dim": 16},
    "gemma2": {"head_dim": 16, "sliding_window": 8},
    "gemma3_text": {"head_dim": 16, "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]},
    "phi3": {},
    "olmo2": {},
    "granite": {},
    "opt": {"ffn_dim": 128, "word_embed_proj_dim": 64, "do_layer_norm_before": True},
    "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256, "n_inner": 128},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen3_moe": {"num_experts": 4, **MOE, "head_dim": 16, "decoder_sparse_step": 1, "mlp_only_layers": []},
    "gpt_oss": {
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "intermediate_size": 64,
        "head_dim": 16,
        "sliding_window": 8,
        "layer_types": ["sliding_attention", "full_attention"],
    },
    "deepseek_v3": {
        "n_routed_experts": 4,
        **MOE,
        "n_shared_experts": 1,
        "n_group": 1,
        "topk_group": 1,
        "first_k_dense_replace": 1,
        "kv_lora_rank": 16,
        "q_lora_rank": 32,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 16,
        "num_key_value_heads": 4,
    },
}
MOE_FAMILIES = ("mixtral", "qwen3_moe", "gpt_oss", "deepseek_v3")
# Expert weights the checkpoint layout keeps fused and transposed ([E, in, out]): stored stacked, no 2:4 export.
FUSED_ON_DISK = ("gpt_oss",)


def model_from_config(family: str, seed: int, config: dict):
    """A random fp32 model of `family` with these config fields, in eval mode; its weights depend on `seed` only."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **config), dtype=torch.float32)
    return model.eval()


def make_family_model(family: str, seed: int = 0):
    return model_from_config(family, seed, {**COMMON, **FAMILY_CONFIGS[family]})
