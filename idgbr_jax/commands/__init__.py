"""One module per `idgbr` subcommand; each defines its absl flags and `main(argv)`."""
