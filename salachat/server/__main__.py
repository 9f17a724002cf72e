"""`python -m salachat.server [OPTIONS]`: the same as `salachat serve`."""

import typer

from salachat.server.command import serve

if __name__ == "__main__":
    from salachat.errors import UserError

    try:
        typer.run(serve)
    except UserError as e:
        import sys

        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.code)
