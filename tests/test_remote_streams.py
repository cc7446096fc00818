"""How the remote driver reaches a daemon: the unix socket it picks, the ssh command line and the
command run on the remote host (checked against what libvirt's own client, virsh, runs), TLS files,
and the URI parameters it refuses. No daemon needed: ssh is a recording stand-in here (the real
sshd is in test_remote_transports.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

import aiovirt
from aiovirt._uri import ParsedURI
from aiovirt.drivers.remote._streams import remote_command, ssh_argv, tls_files, unix_socket_path

from ._libvirtd import SCRIPT


def p(uri: str) -> ParsedURI:
    return aiovirt.parse_uri(uri)


def test_unix_socket_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    assert unix_socket_path(p("qemu+unix:///system?socket=/s/x"), False) == "/s/x"
    assert unix_socket_path(p("qemu+unix:///system"), False, exists=False) == "/var/run/libvirt/libvirt-sock"
    assert (
        unix_socket_path(p("qemu+unix:///system"), True, exists=False) == "/var/run/libvirt/libvirt-sock-ro"
    )
    # The modular daemon's socket when it exists (mode=auto), or when asked for.
    assert unix_socket_path(p("qemu+unix:///system"), False, exists=True) == "/var/run/libvirt/virtqemud-sock"
    assert (
        unix_socket_path(p("qemu+unix:///system?mode=direct"), True) == "/var/run/libvirt/virtqemud-sock-ro"
    )
    assert unix_socket_path(p("qemu+unix:///system?mode=legacy"), False, exists=True).endswith(
        "/libvirt-sock"
    )
    # ssh: the legacy socket on the remote host (libvirt 9.0's netcat fallback), never "direct".
    assert unix_socket_path(p("qemu+ssh://h/system"), False) == "/var/run/libvirt/libvirt-sock"
    with pytest.raises(aiovirt.InvalidURIError, match="direct"):
        unix_socket_path(p("qemu+ssh://h/system?mode=direct"), False)
    with pytest.raises(aiovirt.InvalidURIError, match="mode"):
        unix_socket_path(p("qemu+unix:///system?mode=fast"), False)
    with pytest.raises(aiovirt.InvalidURIError, match="absolute"):
        unix_socket_path(p("qemu+unix:///system?socket=relative/sock"), False)
    # A user's own daemon: the session, and (as non-root) the test driver.
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert (
        unix_socket_path(p("qemu+unix:///session"), True, exists=False)
        == "/run/user/1000/libvirt/libvirt-sock"
    )
    assert (
        unix_socket_path(p("test+unix:///default"), False, exists=False)
        == "/run/user/1000/libvirt/libvirt-sock"
    )


def test_ssh_command_line() -> None:
    uri = "qemu+ssh://bob@host.example:2222/system?keyfile=/k/id&no_tty=1&known_hosts=/k/kh&known_hosts_verify=auto"
    argv = ssh_argv(p(uri), False)
    assert argv[:-1] == [
        "ssh", "-p", "2222", "-l", "bob", "-i", "/k/id", "-T", "-e", "none", "-o", "BatchMode=yes",
        "-o", "UserKnownHostsFile=/k/kh", "-o", "StrictHostKeyChecking=accept-new", "--", "host.example",
    ]  # fmt: skip
    assert ssh_argv(p("qemu+ssh://h/system?command=/opt/ssh"), False)[:5] == [
        "/opt/ssh",
        "-T",
        "-e",
        "none",
        "--",
    ]
    for bad in ("known_hosts_verify=maybe", "no_tty=yes", "keyfile=", "mode=direct"):
        with pytest.raises(aiovirt.InvalidURIError):
            ssh_argv(p(f"qemu+ssh://h/system?{bad}"), False)


def test_remote_command_quotes_every_word(tmp_path: Path) -> None:
    # libvirt 9.0 pastes the socket path into the remote shell unquoted; aiovirt quotes it.
    weird = "/tmp/a b/s'ck;touch pwned"
    uri = "qemu+ssh://h/system?socket=" + weird.replace(" ", "%20").replace("'", "%27").replace(";", "%3B")
    ran = run_remotely(remote_command(p(uri), False), tmp_path, helper=True)
    assert ran == ["nc", "-q0", "-U", weird]
    assert not (tmp_path / "pwned").exists()


def test_tls_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    files = tls_files(p("qemu+tls://h/system?pkipath=/pki"))
    assert (files.ca, files.cert, files.key) == (
        Path("/pki/cacert.pem"),
        Path("/pki/clientcert.pem"),
        Path("/pki/clientkey.pem"),
    )
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert tls_files(p("qemu+tls://h/system")).key == Path("/etc/pki/libvirt/private/clientkey.pem")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".pki" / "libvirt").mkdir(parents=True)
    (tmp_path / ".pki" / "libvirt" / "cacert.pem").write_text("")
    assert tls_files(p("qemu+tls://h/system")).cert == tmp_path / ".pki" / "libvirt" / "clientcert.pem"


# -- what libvirt's own client runs, and what aiovirt runs -------------------------------------------


@pytest.fixture(scope="module")
def virsh() -> str:
    if shutil.which("virsh") is None:
        subprocess.run([str(SCRIPT), "install"], check=True, capture_output=True, timeout=600)
    path = shutil.which("virsh")
    assert path is not None, "virsh (libvirt-clients) is needed to compare with libvirt's own client"
    return path


def _recording_ssh(tmp_path: Path) -> Path:
    ssh = tmp_path / "ssh"
    ssh.write_text(f'#!/bin/sh\nprintf "%s\\0" "$@" > {tmp_path}/argv\nexit 1\n')
    ssh.chmod(0o755)
    return ssh


def libvirts_argv(virsh: str, tmp_path: Path, uri: str, *, readonly: bool = False) -> list[str]:
    """The argv libvirt's client gives ssh for ``uri`` (its ``command=`` records it and fails)."""
    ssh = _recording_ssh(tmp_path)
    sep = "&" if "?" in uri else "?"
    args = [virsh, *(["-r"] if readonly else []), "-c", f"{uri}{sep}command={ssh}", "uri"]
    subprocess.run(args, capture_output=True, timeout=30, check=False)
    recorded = (tmp_path / "argv").read_bytes().split(b"\0")[:-1]
    return [ssh.name, *(a.decode() for a in recorded)]


def run_remotely(command: str, tmp_path: Path, *, helper: bool) -> list[str]:
    """Run a remote command as sshd would (``sh -c COMMAND``) on a host whose ``nc`` (netcat-openbsd's
    answer to libvirt's ``-q`` probe) and, if ``helper``, ``virt-ssh-helper`` record their argv."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("sh", "grep", "which"):
        target = shutil.which(tool)
        assert target is not None
        (bin_dir / tool).unlink(missing_ok=True)
        (bin_dir / tool).symlink_to(target)
    record = f'printf "%s\\0" "${{0##*/}}" "$@" > {tmp_path}/ran\n'
    nc = bin_dir / "nc"
    probe = 'if [ "$*" = "-q" ]; then echo "nc: option requires an argument -- q" >&2; exit 1; fi\n'
    nc.write_text("#!/bin/sh\n" + probe + record)
    (bin_dir / "mync").unlink(missing_ok=True)
    (bin_dir / "mync").symlink_to(nc)  # for ?netcat=mync
    (bin_dir / "virt-ssh-helper").unlink(missing_ok=True)
    if helper:
        (bin_dir / "virt-ssh-helper").write_text("#!/bin/sh\n" + record)
        (bin_dir / "virt-ssh-helper").chmod(0o755)
    nc.chmod(0o755)
    (tmp_path / "ran").unlink(missing_ok=True)
    subprocess.run(["/bin/sh", "-c", command], env={"PATH": str(bin_dir)}, timeout=30, check=True)
    return [a.decode() for a in (tmp_path / "ran").read_bytes().split(b"\0")[:-1]]


@pytest.mark.parametrize(
    ("uri", "readonly"),
    [
        ("qemu+ssh://bob@host.example:2222/system?socket=/tmp/lvd/sock/libvirt-sock&keyfile=/k/id", False),
        ("qemu+ssh://host.example/system?no_tty=1", False),
        ("qemu+ssh://host.example/system", True),
        ("qemu+ssh://host.example/session", False),
        ("test+ssh://host.example/default?netcat=mync", True),
    ],
)
@pytest.mark.parametrize("helper", [True, False], ids=["with-virt-ssh-helper", "netcat-only"])
def test_same_command_as_libvirts_own_client(
    virsh: str, tmp_path: Path, uri: str, readonly: bool, helper: bool
) -> None:
    theirs = libvirts_argv(virsh, tmp_path, uri, readonly=readonly)
    ours = ssh_argv(p(uri), readonly)
    assert ours[:-1] == theirs[:-1]
    # The remote commands differ in quoting only: on a host, both run the same program, same argv.
    ran_theirs = run_remotely(theirs[-1], tmp_path, helper=helper)
    ran_ours = run_remotely(ours[-1], tmp_path, helper=helper)
    assert ran_ours == ran_theirs
    assert ran_ours[0] in ("nc", "mync", "virt-ssh-helper")
