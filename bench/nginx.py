"""Running nginx (Debian's) for the edge cases: a whole ``nginx.conf`` of our own around an included file.

``main_conf`` is shared with the test suite (tests/test_nginx.py), which runs the same nginx the same way.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .processes import BenchError

WORKERS = 1  # like the gateway's one process: the ratios compare one worker with one worker


def nginx_binary() -> str:
    """The nginx executable (Debian puts it in /usr/sbin, which a non-root PATH may lack); BenchError if none."""
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    if found is None:
        raise BenchError("nginx is not installed (Debian: apt-get install nginx-light)")
    return found


def main_conf(tmp: Path, include: Path, workers: int = WORKERS) -> Path:
    """Write ``tmp/nginx.conf``: nginx in the foreground, every path of its own under ``tmp``, ``include`` in
    its ``http {}`` context. Start it with ``nginx -p tmp -c tmp/nginx.conf``."""
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp / sub).mkdir(exist_ok=True)
    conf = tmp / "nginx.conf"
    conf.write_text(
        f"daemon off;\nworker_processes {workers};\npid {tmp}/nginx.pid;\nerror_log {tmp}/error.log warn;\n"
        "events { worker_connections 1024; }\n"
        f"http {{\n  client_body_temp_path {tmp}/body;\n  proxy_temp_path {tmp}/proxy;\n"
        f"  fastcgi_temp_path {tmp}/fastcgi;\n  uwsgi_temp_path {tmp}/uwsgi;\n  scgi_temp_path {tmp}/scgi;\n"
        f"  include {include};\n}}\n"
    )
    return conf


def plain_proxy(listen: str, upstream: str) -> str:
    """nginx alone: a reverse proxy to ``upstream`` (host:port) over keep-alive connections, nothing else."""
    return (
        f"upstream bench_upstream {{\n    server {upstream};\n    keepalive 32;\n}}\n"
        f"server {{\n    listen {listen};\n    access_log off;\n"
        "    location / {\n        proxy_pass http://bench_upstream;\n        proxy_http_version 1.1;\n"
        '        proxy_set_header Connection "";\n    }\n}\n'
    )
