"""Make the HTML benchmark history that ``asv publish`` writes work with no network.

asv's ``index.html`` loads jQuery, flot, Bootstrap and three small plugins from CDNs and
shows only an error page when they fail to load.  This script copies each of them from the
npm registry (``npm pack``, cached) into ``<html>/vendor/``, points the page at the copies,
and fails if any page still loads a script or style sheet from the network.  The page reads
its data with XMLHttpRequest, which browsers refuse for ``file://`` pages, so serve the folder
on this machine: ``asv preview``, or ``python -m http.server -d html``.

Usage: ``python publish_offline.py HTML_DIR --cache DIR`` (``nox -s bench_publish`` runs it).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import posixpath
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

# cdnjs names libraries differently from npm.  npm has flot 0.8.3 unminified only, and not
# stupidtable 1.0.1 (stupid-table-plugin 1.1.3 keeps its API): see REBUILT.
CDNJS = {
    "flot/0.8.3/jquery.flot.min.js": ("flot@0.8.3", "jquery.flot.js"),
    "flot/0.8.3/jquery.flot.time.min.js": ("flot@0.8.3", "jquery.flot.time.js"),
    "flot/0.8.3/jquery.flot.selection.min.js": ("flot@0.8.3", "jquery.flot.selection.js"),
    "flot/0.8.3/jquery.flot.categories.min.js": ("flot@0.8.3", "jquery.flot.categories.js"),
    "stupidtable/1.0.1/stupidtable.min.js": ("stupid-table-plugin@1.1.3", "stupidtable.min.js"),
    "blueimp-md5/2.19.0/js/md5.min.js": ("blueimp-md5@2.19.0", "js/md5.min.js"),
}
# Packages whose files differ from the CDN's, so the page's integrity hashes cannot match;
# every other copy must match the hash the page gives.
REBUILT = {"flot@0.8.3", "stupid-table-plugin@1.1.3"}

TAG = re.compile(r"<(?:script|link)\b[^>]*>", re.IGNORECASE)
REMOTE = re.compile(r'\b(?:src|href)="(https?://[^"]+)"')
# Attributes that make sense for a CDN only: a file:// or localhost copy needs no CORS.
CDN_ONLY = re.compile(r'\s+(?:integrity|crossorigin|referrerpolicy)="[^"]*"')
CSS_URL = re.compile(r"""url\((['"]?)([^'")]+)\1\)""")


def npm_file(url):
    """``(package@version, path)`` of the file in an npm package that replaces ``url``."""
    if m := re.fullmatch(r"https://cdn\.jsdelivr\.net/npm/((?:@[^/]+/)?[^/@]+@[^/]+)/(.+)", url):
        return m[1], m[2]
    if m := re.fullmatch(r"https://code\.jquery\.com/jquery-([\d.]+)\.min\.js", url):
        return f"jquery@{m[1]}", "dist/jquery.min.js"
    if m := re.fullmatch(r"https://cdnjs\.cloudflare\.com/ajax/libs/(.+)", url):
        if m[1] in CDNJS:
            return CDNJS[m[1]]
    raise SystemExit(f"publish_offline.py: no npm copy is known for {url}: add one to CDNJS")


def tarball(package, cache):
    """The npm tarball of ``package`` (``name@version``), fetched once into ``cache``."""
    name, version = package.rsplit("@", 1)
    path = cache / f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["npm", "pack", package, "--pack-destination", str(cache), "--silent"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return path


def copy(package, path, cache, vendor):
    """Copy ``path`` of ``package`` into ``vendor``, with the files a style sheet refers to;
    the page-relative address of the copy."""
    with tarfile.open(tarball(package, cache)) as tar:
        todo, done = [path], set()
        while todo:
            member = todo.pop()
            if member in done:
                continue
            done.add(member)
            data = tar.extractfile(f"package/{member}").read()
            target = vendor / package / member
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            if member.endswith(".css"):  # fonts and images, relative to the sheet
                for _, ref in CSS_URL.findall(data.decode()):
                    ref = re.split(r"[?#]", ref)[0]
                    if ref and not re.match(r"[a-z]+:|/", ref):
                        todo.append(
                            posixpath.normpath(posixpath.join(posixpath.dirname(member), ref))
                        )
    return f"{vendor.name}/{package}/{path}"


def check_integrity(tag, package, path, vendor):
    """Fail when a copy that should be the CDN's own file does not match the page's hash."""
    m = re.search(r'\bintegrity="(sha\d+)-([^"]+)"', tag)
    if m is None or package in REBUILT:
        return
    digest = hashlib.new(m[1], (vendor / package / path).read_bytes()).digest()
    if base64.b64encode(digest).decode() != m[2]:
        raise SystemExit(f"publish_offline.py: {package}/{path} does not match {tag}")


def make_offline(html, cache):
    """Rewrite every page in ``html`` to load its scripts and styles from ``html/vendor``."""
    vendor = html / "vendor"
    shutil.rmtree(vendor, ignore_errors=True)

    def local(match):
        tag = match[0]
        url = REMOTE.search(tag)
        if url is None:
            return tag
        package, path = npm_file(url[1])
        address = copy(package, path, cache, vendor)
        check_integrity(tag, package, path, vendor)
        return CDN_ONLY.sub("", tag.replace(url[1], address))

    for page in sorted(html.glob("*.html")):
        text = TAG.sub(local, page.read_text(encoding="utf-8"))
        left = [url for tag in TAG.findall(text) for url in REMOTE.findall(tag)]
        if left:
            raise SystemExit(f"publish_offline.py: {page.name} still loads {left}")
        page.write_text(text, encoding="utf-8")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("html", type=Path, help="the folder asv publish wrote")
    parser.add_argument("--cache", type=Path, required=True, help="folder for npm tarballs")
    args = parser.parse_args(argv)
    make_offline(args.html, args.cache)


if __name__ == "__main__":
    main()
