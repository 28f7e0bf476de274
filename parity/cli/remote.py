"""Checkpoints by name or URL: resolved to a file in the download cache, downloaded once, resumed, verified.

`resolve(spec)` turns what a user may pass where a checkpoint is read into a local path:

    a path that exists                 unchanged (nothing printed)
    ViT-B_16@imagenet21k+imagenet2012  a catalogue name (`python -m vit_jax models`), fetched under VIT_MIRROR_GCS_URL
    gs://vit_models/augreg/FILE.npz    fetched as VIT_MIRROR_GCS_URL/vit_models/augreg/FILE.npz
    B_16-i21k-300ep-...-res_384[.npz]  an AugReg filename (index.csv's `filename` or `adapt_filename`)
    https://HOST/FILE, http://...      fetched as given
    hf-hub:ORG/NAME[@REVISION]         a Hugging Face hub repo, through huggingface_hub (its cache, its token)
    timm/NAME                          the hub repo timm/NAME (timm's weights), the same way

`FILE.npz:SUBTREE` keeps working after any of these (`gs://.../x.npz:img`). The resolved file is said on
stderr before anything else is read.

Downloads go to `$VIT_MIRROR_CACHE` (default ~/.cache/vit-mirror): first to `FILE.part`, resumed with an
HTTP range request when a transfer broke, and renamed to FILE only once its size and checksum are right
(the catalogue's sha256, else the server's `x-goog-hash` md5 or an md5 ETag, else the size alone). A lock
per file (`FILE.lock`, flock) makes concurrent processes download it once: the others wait and then read
the cached file, which is also how a `jax.distributed` run downloads once per host cache (process 0 or
whichever comes first; the rest wait on the lock). `--offline` or VIT_MIRROR_OFFLINE=1 reads only the
cache. Every failure is one `UserError`; only an interrupted transfer leaves something behind, its
resumable `.part`, which `models --prune` removes.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import errno
import fcntl
import hashlib
import http.client
import os
import re
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Iterator, Optional

from parity.cli.contract import say
from parity.core import catalogue, files
from parity.core.errors import UserError, cause

CACHE_ENV = 'VIT_MIRROR_CACHE'
OFFLINE_ENV = 'VIT_MIRROR_OFFLINE'
GCS_ENV = 'VIT_MIRROR_GCS_URL'
TIMEOUT_ENV = 'VIT_MIRROR_TIMEOUT'  # seconds a connection may stay silent (default 60)
GCS_DEFAULT = 'https://storage.googleapis.com'
PART, LOCK = '.part', '.lock'
CHUNK = 1 << 20

OFFLINE_HELP = ('read checkpoint names and URLs from the download cache only, never the network (also '
                f'{OFFLINE_ENV}=1); the cache is ${CACHE_ENV}, default ~/.cache/vit-mirror')


def add_offline_argument(parser: argparse.ArgumentParser) -> None:
    """`--offline`: sets VIT_MIRROR_OFFLINE=1 for this process (and the children it starts) when parsed."""
    parser.add_argument('--offline', action=_Offline, nargs=0, default=False, help=OFFLINE_HELP)


class _Offline(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        os.environ[OFFLINE_ENV] = '1'
        setattr(namespace, self.dest, True)


def cache_dir() -> str:
    """The download cache: $VIT_MIRROR_CACHE, default ~/.cache/vit-mirror."""
    return os.path.abspath(os.path.expanduser(os.environ.get(CACHE_ENV) or '~/.cache/vit-mirror'))


def offline() -> bool:
    return os.environ.get(OFFLINE_ENV, '') not in ('', '0')


def gcs_base() -> str:
    return (os.environ.get(GCS_ENV) or GCS_DEFAULT).rstrip('/')


def timeout() -> float:
    value = os.environ.get(TIMEOUT_ENV)
    try:
        return float(value) if value else 60.0
    except ValueError:
        raise UserError(f'{TIMEOUT_ENV}={value!r}: not a number of seconds') from None


# --------------------------------------------------------------------------- what a spec names

AUGREG_FILE = re.compile(r'[\w+]+-i(1k|21k|21k_30)-\d+ep-lr_[\d.]+-aug_\w+-wd_[\d.]+-do_[\d.]+-sd_[\d.]+'
                         r'(--[\w.]+-steps_\w+-lr_[\d.]+-res_\d+)?(\.npz)?')


def is_remote(spec: Optional[str]) -> bool:
    """Whether `spec` names a checkpoint this module fetches (not a local path)."""
    if not spec or os.path.exists(spec):
        return False
    base = _split_subtree(spec)[0]
    return (base.startswith(('http://', 'https://', 'gs://', 'hf-hub:', 'timm/'))
            or catalogue.find(base) is not None or AUGREG_FILE.fullmatch(base) is not None)


def absolute(spec: Optional[str]) -> Optional[str]:
    """A spec to record in a run: a local path made absolute, a name or URL as given."""
    if spec is None or is_remote(spec):
        return spec
    return os.path.abspath(spec)


def _split_subtree(spec: str) -> tuple[str, Optional[str]]:
    """'URL.npz:SUBTREE' -> (URL.npz, SUBTREE): only after a name ending in .npz, so ports and schemes stay."""
    m = re.fullmatch(r'(.+\.npz):([\w./-]+)', spec)
    return (m.group(1), m.group(2)) if m else (spec, None)


def resolve(spec: str) -> str:
    """The local path of checkpoint `spec`, downloading it into the cache first if need be (see the module doc).

    A local path comes back unchanged; anything else is said on stderr as `SPEC: PATH`, before the
    download starts (a hub name: once huggingface_hub has its snapshot folder).
    """
    if not spec or os.path.exists(spec):
        return spec
    base, subtree = _split_subtree(spec)
    if os.path.exists(base):
        return spec
    if base.startswith(('hf-hub:', 'timm/')):
        path = hub(base[len('hf-hub:'):] if base.startswith('hf-hub:') else base, base)
        say(f'{base}: {path}')
    else:
        url, key, size, sha256 = _locate(base)
        say(f'{base}: {os.path.join(cache_dir(), key)}')
        path = fetch(url, key, size, sha256)
    return f'{path}:{subtree}' if subtree else path


def _locate(spec: str) -> tuple[str, str, Optional[int], Optional[str]]:
    """(URL, cache key, size, sha256) of a URL, gs:// path, catalogue name or AugReg filename."""
    if spec.startswith(('http://', 'https://')):
        return spec, _url_key(spec), None, None
    size = sha256 = None
    row = catalogue.find(spec)
    if spec.startswith('gs://'):
        key = spec[len('gs://'):]
    elif row is not None:
        key, size, sha256 = row.url[len('gs://'):], row.size, row.sha256
    elif AUGREG_FILE.fullmatch(spec):
        key = f'vit_models/augreg/{spec if spec.endswith(".npz") else spec + ".npz"}'
    else:
        close = catalogue.close_names(spec)
        hint = f' (did you mean {", ".join(close)}?)' if close else ''
        raise UserError(f'{spec}: no such file, and not a checkpoint name{hint}; pass a path, a name of `python -m '
                        'vit_jax models`, an AugReg filename, a gs://, https:// or hf-hub: URL, or timm/NAME')
    return f'{gcs_base()}/{urllib.parse.quote(key)}', os.path.join('gs', key), size, sha256


def _url_key(url: str) -> str:
    """The cache path of a URL: url/HOST_PORT/PATH (a query string hashed into the name)."""
    u = urllib.parse.urlsplit(url)
    parts = [p for p in urllib.parse.unquote(u.path).split('/') if p not in ('', '.', '..')] or ['index']
    if u.query:
        parts[-1] += '-' + hashlib.sha256(u.query.encode()).hexdigest()[:12]
    host = re.sub(r'[^\w.-]', '_', u.netloc)
    return os.path.join('url', host, *(re.sub(r'[^\w.+=@-]', '_', p) for p in parts))


# --------------------------------------------------------------------------- the download

def fetch(url: str, key: str, size: Optional[int] = None, sha256: Optional[str] = None) -> str:
    """The cached file `key` (a path under the cache), downloaded from `url` when it is not there yet.

    `size` and `sha256`, when known, are what the file must be.
    """
    path = os.path.join(cache_dir(), key)
    if os.path.isfile(path):
        return path
    if offline():
        raise UserError(f'{url}: not in the download cache ({path}) and offline ({OFFLINE_ENV}=1 or --offline); '
                        'run once online, or copy the file there')
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    except OSError as e:
        raise _cache_error(path, e) from None
    with _file_lock(path):
        if os.path.isfile(path):  # another process downloaded it while this one waited
            return path
        _download(url, path, size, sha256)
    return path


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    """Holds PATH.lock (flock) for one download; waits, saying so, while another process holds it."""
    lock = path + LOCK
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise _cache_error(path, e) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                say(f'waiting for another process downloading {os.path.basename(path)}')
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                # No flock on this file system: the atomic rename still keeps the cache whole.
            try:
                same = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except FileNotFoundError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            break
        os.close(fd)  # the holder removed the lock file as we took it: lock the new one
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


def _download(url: str, path: str, size: Optional[int], sha256: Optional[str]) -> None:
    """URL into PATH.part (resumed from what is there), checked, then renamed to PATH."""
    part = path + PART
    have = os.path.getsize(part) if os.path.isfile(part) else 0
    response = _open(url, have, part)
    with response:
        if response.status == 206 and have:
            start, total = _content_range(response.headers.get('Content-Range'))
            if start != have:  # not the rest of what is there: start again from nothing
                response.close()
                _discard(part)
                return _download(url, path, size, sha256)
            say(f'resuming {url} at {have / 2**20:.1f} MiB')
        else:
            have = 0  # the server sent the whole file
            length = response.headers.get('Content-Length')
            total = int(length) if length and length.isdigit() else None
        total = total if total is not None else size
        if size is not None and total is not None and total != size:
            raise UserError(f'{url}: the server offers {total} bytes and the catalogue says {size}; the file there '
                            'is not the one recorded (report it, or pass the URL itself to take it as it is)')
        expected_md5 = _server_md5(response.headers)
        if total is None or have == 0:
            say(f'downloading {url}' + (f' ({total / 2**20:.1f} MiB)' if total else ''))
        _receive(response, part, have, total, url)
    _verify(url, part, total, sha256, expected_md5)
    try:
        os.replace(part, path)
    except OSError as e:
        raise _cache_error(path, e) from None


def _open(url: str, have: int, part: str):
    request = urllib.request.Request(url, headers={'User-Agent': 'vit-mirror',
                                                   **({'Range': f'bytes={have}-'} if have else {})})
    try:
        return urllib.request.urlopen(request, timeout=timeout())
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and have:  # the .part is not a prefix of this file (longer than it): start over
            _discard(part)
            return _open(url, 0, part)
        if e.code == 404:
            raise UserError(f'{url}: not found on the server (HTTP 404); check the name with '
                            '`python -m vit_jax models`, or the URL') from None
        if e.code in (401, 403):
            raise UserError(f'{url}: the server refuses access (HTTP {e.code}); check the URL') from None
        raise UserError(f'{url}: the server answered HTTP {e.code} {e.reason}; try again later') from None
    except (urllib.error.URLError, http.client.HTTPException, socket.timeout, ConnectionError, OSError) as e:
        raise UserError(f'{url}: cannot reach the server ({_reason(e)}); check the network, or run with --offline '
                        f'to use the cache ({cache_dir()})') from None


def _reason(e: BaseException) -> str:
    if isinstance(e, urllib.error.URLError) and not isinstance(e.reason, str):
        e = e.reason
    if isinstance(e, (socket.timeout, TimeoutError)):
        return f'no answer within {timeout():g} s ({TIMEOUT_ENV})'
    return cause(e)


def _content_range(content_range: Optional[str]) -> tuple[Optional[int], Optional[int]]:
    """(first byte, total size) of a 206's `Content-Range: bytes FIRST-LAST/TOTAL`."""
    m = re.fullmatch(r'bytes (\d+)-\d+/(\d+|\*)', (content_range or '').strip())
    if not m:
        return None, None
    return int(m.group(1)), int(m.group(2)) if m.group(2) != '*' else None


def _server_md5(headers) -> Optional[str]:
    """The md5 (hex) the server states: GCS's `x-goog-hash: crc32c=...,md5=BASE64`, else an ETag that is an md5."""
    for value in headers.get_all('x-goog-hash') or ():
        for item in value.split(','):
            name, _, digest = item.strip().partition('=')
            if name == 'md5':
                with contextlib.suppress(ValueError):
                    return base64.b64decode(digest).hex()
    etag = (headers.get('ETag') or '').strip().strip('"')
    return etag.lower() if re.fullmatch(r'[0-9a-fA-F]{32}', etag) else None


def _receive(response, part: str, have: int, total: Optional[int], url: str) -> None:
    """The body into `part` (appended after `have` bytes), with a progress bar on stderr; a broken transfer keeps
    what arrived, for the next run to resume."""
    from tqdm import tqdm

    name = os.path.basename(part)[:-len(PART)]
    bar = tqdm(total=total, initial=have, unit='B', unit_scale=True, unit_divisor=1024, desc=name[:40],
               file=sys.stderr, disable=None, mininterval=0.5)
    try:
        with open(part, 'ab' if have else 'wb') as f:
            while True:
                try:
                    chunk = response.read1(CHUNK)  # what has arrived: the .part grows as the bytes come
                except (socket.timeout, TimeoutError, http.client.HTTPException, ConnectionError, OSError) as e:
                    raise UserError(f'{url}: the transfer broke after {f.tell() / 2**20:.1f} MiB ({_reason(e)}); '
                                    'run the same command again to resume it') from None
                if not chunk:
                    break
                try:
                    f.write(chunk)
                except OSError as e:
                    f.close()
                    _discard(part)
                    raise _cache_error(part[:-len(PART)], e) from None
                bar.update(len(chunk))
            try:
                f.flush()
                os.fsync(f.fileno())
            except OSError as e:
                _discard(part)
                raise _cache_error(part[:-len(PART)], e) from None
    except OSError as e:  # opening the .part
        raise _cache_error(part[:-len(PART)], e) from None
    finally:
        bar.close()


def _verify(url: str, part: str, total: Optional[int], sha256: Optional[str], md5: Optional[str]) -> None:
    """The size, then the strongest checksum known; a file that fails is deleted (a resume cannot mend it)."""
    got = os.path.getsize(part)
    if total is not None and got < total:
        raise UserError(f'{url}: the transfer ended after {got} of {total} bytes; run the same command again to '
                        'resume it')
    if total is not None and got != total:
        _discard(part)
        raise UserError(f'{url}: received {got} bytes where the server said {total}; the partial file was deleted, '
                        'try again')
    for algorithm, expected in (('sha256', sha256), ('md5', md5)):
        if not expected:
            continue
        digest = hashlib.new(algorithm)
        with open(part, 'rb') as f:
            for block in iter(lambda: f.read(CHUNK), b''):
                digest.update(block)
        if digest.hexdigest() != expected.lower():
            _discard(part)
            raise UserError(f'{url}: the downloaded file fails its {algorithm} check ({digest.hexdigest()[:12]}... '
                            f'where {expected[:12]}... was expected); it was deleted, try again')
        return


def _discard(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _cache_error(path: str, e: OSError) -> UserError:
    """An OSError in the cache, as one line that says what to do."""
    if e.errno in files.WRITE_ERRNOS or e.errno in (errno.EACCES, errno.EPERM):
        advice = {errno.EACCES: 'the cache is not writable', errno.EPERM: 'the cache is not writable',
                  errno.EROFS: 'the cache is on a read-only file system'}.get(
            e.errno, 'the disk is full' if e.errno in (errno.ENOSPC, errno.EDQUOT) else 'the file is too large here')
        return UserError(f'{path}: cannot write the download cache: {advice}; set {CACHE_ENV} to a writable folder '
                         'with room for the file')
    return UserError(f'{path}: the download cache failed ({cause(e)}); set {CACHE_ENV} to another folder')


# --------------------------------------------------------------------------- the Hugging Face hub

HUB_WEIGHTS = (['*.json', '*.safetensors'], ['*.json', 'pytorch_model.bin', '*.pth'])


def hub(repo: str, spec: str) -> str:
    """The local snapshot folder of hub repo `ORG/NAME[@REVISION]`, through huggingface_hub (its cache and token;
    offline: its cache only). Only the config and the weights are fetched."""
    repo_id, _, revision = repo.partition('@')
    if not re.fullmatch(r'[\w.-]+/[\w.-]+', repo_id):
        raise UserError(f'{spec}: not a hub name; write hf-hub:ORG/NAME[@REVISION] or timm/NAME')
    import huggingface_hub
    from huggingface_hub import errors as hub_errors

    folder = None
    for patterns in HUB_WEIGHTS:
        try:
            folder = huggingface_hub.snapshot_download(repo_id, revision=revision or None, allow_patterns=patterns,
                                                       local_files_only=offline())
        except (hub_errors.RepositoryNotFoundError, hub_errors.RevisionNotFoundError) as e:
            raise UserError(f'{spec}: not on the Hugging Face hub ({cause(e, 100)}); check the name and revision, '
                            'and `huggingface-cli login` for a private repo') from None
        except (hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled) as e:
            raise UserError(f'{spec}: not in the Hugging Face cache, and offline or unreachable ({cause(e, 100)}); '
                            'run once online') from None
        except (hub_errors.HfHubHTTPError, OSError, ValueError) as e:
            raise UserError(f'{spec}: the Hugging Face hub download failed ({cause(e, 120)})') from None
        if any(n.endswith(('.safetensors', '.bin', '.pth')) for n in os.listdir(folder)):
            return folder
    raise UserError(f'{spec}: the hub repo holds no model.safetensors nor pytorch_model.bin')


# --------------------------------------------------------------------------- the cache itself

def cached() -> list[tuple[str, int]]:
    """(path relative to the cache, bytes) of each whole file in the cache."""
    root, out = cache_dir(), []
    for folder, _, names in os.walk(root):
        for name in sorted(names):
            if name.endswith((PART, LOCK)):
                continue
            full = os.path.join(folder, name)
            out.append((os.path.relpath(full, root), os.path.getsize(full)))
    return sorted(out)


def prune() -> list[str]:
    """Deletes the partial downloads (`.part`) and lock files no process holds; returns what was deleted."""
    root, removed = cache_dir(), []
    for folder, _, names in os.walk(root):
        for name in sorted(names):
            full = os.path.join(folder, name)
            if not name.endswith((PART, LOCK)):
                continue
            target = full[:-len(PART)] if name.endswith(PART) else full[:-len(LOCK)]
            if _busy(target + LOCK):
                continue  # a download in progress
            with contextlib.suppress(FileNotFoundError):
                os.unlink(full)
                removed.append(os.path.relpath(full, root))
    return removed


def _busy(lock: str) -> bool:
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)
