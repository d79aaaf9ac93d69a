"""The `python -m laserjax <command>` commands, one module each.

Each module is a thin layer over the library: `add_arguments(parser)` declares its flags and
`run(args)` builds a config from them and calls the library. Only `laserjax.cli` imports these
modules, and no command imports another.
"""
