"""Stage code of the compression workflow: one module per stage, each with a small CLI."""
