"""The command line's subcommands: argument parsing and the one call each makes into the engine."""
