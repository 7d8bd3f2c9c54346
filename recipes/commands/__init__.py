"""The `vqdiff` commands, one module per group; `recipes.cli` registers them on the Typer app."""
