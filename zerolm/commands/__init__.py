"""The `zerolm` subcommands: each module has `setup_arg_parser(subparsers)` and the entry
functions its parsers dispatch to (`args.run(args, extra)`); zerolm/cli.py is their table."""
