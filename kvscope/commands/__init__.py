"""The commands: one module per `kvscope` subcommand, each a thin orchestration over the layers below."""
