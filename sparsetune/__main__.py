from sparsetune.cli.app import main

main()
