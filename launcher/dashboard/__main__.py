"""`python -m launcher.dashboard [--host H] [--port N] [--config FILE] [--token T] [--allow-launch]`:
the dashboard without the CLI (what `meetara dashboard` runs)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from launcher.dashboard import Refused, serve


def main(argv: list[str] | None = None) -> int:
    """Parse the flags and serve; a refusal is one line on stderr and exit 2."""
    p = argparse.ArgumentParser(prog="python -m launcher.dashboard", description=__doc__)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0: a free one)")
    p.add_argument("--config", type=Path, default=None, help="preferences file")
    p.add_argument(
        "--token",
        default=os.environ.get("MEETARA_DASHBOARD_TOKEN") or None,
        help="every request must carry it (default: MEETARA_DASHBOARD_TOKEN)",
    )
    p.add_argument("--allow-launch", action="store_true", help="let the dashboard start runs (spends money)")
    args = p.parse_args(argv)
    try:
        serve(
            host=args.host,
            port=args.port,
            config=args.config,
            token=args.token,
            allow_launch=args.allow_launch,
        )
    except Refused as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
