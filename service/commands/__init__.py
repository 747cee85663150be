"""The commands of `coordtok` (service/cli.py builds the parser from them): each module adds its
sub-commands' options (`add_to`) and runs them."""
