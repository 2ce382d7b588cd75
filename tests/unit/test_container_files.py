"""The container image's files and the README's install commands agree with each other and with the package:
the compose service fits the image, the README names the versions that are built, unsupported releases are
refused by the build."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

from dingdifyd import __version__, config
from tests.system import readme

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "etc" / "compose.yaml"
CONTAINERFILE = REPO / "packaging" / "container" / "Containerfile"
IMAGE_TAG = f"dingdifyd:{__version__}-deb13u1"


def containerfile() -> dict[str, str]:
    """Instruction -> its arguments (continuation lines joined); the last one wins, as in a build."""
    text = re.sub(r"\\\n\s*", " ", CONTAINERFILE.read_text(encoding="utf-8"))
    instructions = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            instructions[word] = rest.strip()
    return instructions


def image_env() -> dict[str, str]:
    return dict(re.findall(r"(\w+)=(\S+)", containerfile()["ENV"]))


def test_compose_service_fits_the_image() -> None:
    compose = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    service = compose["services"]["dingdifyd"]
    assert service["image"] == IMAGE_TAG
    assert service["environment"]["DIFY_OPEN_API_URL"] == "http://api:5001/v1"  # Dify's api service
    assert "api" in service["depends_on"]
    volumes = [volume.split(":") for volume in service["volumes"]]
    assert [v[1:] for v in volumes if len(v) == 3] == [[image_env()["DINGDIFYD_CONFIG"], "ro"]]
    state = [v for v in volumes if v[1] == containerfile()["VOLUME"]]
    assert state and state[0][0] in compose["volumes"], "the state volume is not a named volume"
    assert image_env()["CREDENTIALS_DIRECTORY"] == "/run/secrets"  # where compose puts secrets
    for secret in service["secrets"]:
        bot, _, key = secret["target"].partition(".")
        assert bot and key in config.SECRET_KEYS, secret
        assert "file" in compose["secrets"][secret["source"]]
    grace = int(service["stop_grace_period"].removesuffix("s"))
    unit = (REPO / "packaging" / "systemd" / "dingdifyd@.service").read_text(encoding="utf-8")
    [stop] = re.findall(r"^TimeoutStopSec=(\d+)s$", unit, re.MULTILINE)
    assert grace >= int(stop), "compose gives the daemon less time to stop than systemd does"


def test_image_runs_the_init_as_the_package_account() -> None:
    instructions = containerfile()
    init = "/usr/lib/dingdifyd/dingdifyd-init"
    assert instructions["ENTRYPOINT"] == f'["{init}"]'
    assert f'CMD ["{init}", "--health"]' in instructions["HEALTHCHECK"]
    assert instructions["STOPSIGNAL"] == "SIGTERM"
    sysusers = (REPO / "packaging" / "debian" / "dingdifyd.sysusers").read_text(encoding="utf-8")
    assert instructions["USER"] == config.DAEMON_GROUP and f"u {instructions['USER']} " in sysusers
    build_image = (REPO / "packaging" / "build-image").read_text(encoding="utf-8")
    assert f'"$1{init}"' in build_image, "build-image does not install the init where the image runs it"


def test_readme_install_commands_name_what_is_built() -> None:
    [deb_line] = readme.block("install-deb")
    assert f"./dingdifyd_{__version__}~deb12u1_amd64.deb" in deb_line
    assert f"./dingdifyd_{__version__}~deb13u1_amd64.deb" in deb_line
    container = "\n".join(readme.block("container"))
    assert f"dingdifyd_{__version__}~deb13u1_amd64.deb" in container and f"tag {IMAGE_TAG}" in container
    repository = readme.block("install-repository")
    assert repository[0].startswith("repo=") and len(repository) == 4
    assert "/etc/apt/keyrings/" in repository[1] and "/etc/apt/sources.list.d/dingdifyd.sources" in repository[2]
    assert repository[3].endswith("apt-get install -y dingdifyd")
    assert readme.block("upgrade") == ["apt-get update && apt-get upgrade -y"]


def test_debian_unit_files_are_the_packaging_units() -> None:
    for unit in ("dingdifyd.service", "dingdifyd@.service"):
        link = REPO / "packaging" / "debian" / unit
        assert link.is_symlink() and link.resolve() == (REPO / "packaging" / "systemd" / unit).resolve()


def test_build_refuses_an_unsupported_release() -> None:
    result = subprocess.run([str(REPO / "packaging" / "build-deb"), "--release", "bullseye"], capture_output=True,
                            text=True, timeout=30)  # fmt: skip
    assert result.returncode != 0
    assert "unsupported release 'bullseye'" in result.stderr
    assert "bookworm (Debian 12), trixie (Debian 13)" in result.stderr
