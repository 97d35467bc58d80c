"""Device profiles: every bundled one loads and cites sources; bad files fail in one line."""

import json

import pytest

from runtimes.session import cpu_cores
from devices.profiles import PROFILE_DIR, list_profiles, load_profile
from models.errors import EdgesmithError

REQUIRED_DEVICES = {"pixel-8", "oneplus-12", "iphone-15-pro", "jetson-orin-nano", "jetson-agx-orin",
                    "raspberry-pi-5", "x86-desktop", "local"}


def test_bundled_profiles_load_and_cite_sources():
    assert REQUIRED_DEVICES <= set(list_profiles())
    for name in list_profiles():
        if name == "local":
            continue
        prof = load_profile(name)
        text = (PROFILE_DIR / f"{name}.toml").read_text()
        assert prof.sources and all(s.startswith("https://") and s in text for s in prof.sources)
        assert prof.ram_bytes > 1 << 30 and prof.bandwidth_bytes_s > 1e9 and prof.peak_flops
        assert "# " in text  # specs are commented with their derivation


def test_orin_nano_has_super_mode_bandwidth():
    prof = load_profile("jetson-orin-nano")
    assert prof.bandwidth_bytes_s == 102e9 and prof.ram_bytes == 8 << 30


def test_unknown_profile_lists_known_ones():
    with pytest.raises(EdgesmithError, match="unknown device profile 'pixel-9'; known: iphone-15-pro, .*local"):
        load_profile("pixel-9")


GOOD = (PROFILE_DIR / "raspberry-pi-5.toml").read_text()


@pytest.mark.parametrize("edit, match", [
    (('kind = "sbc"', 'kind = "toaster"'), r"kind 'toaster'; allowed: phone, jetson, sbc, desktop"),
    (('formats = ["gguf"', 'formats = ["tflite"'), r"formats entry 'tflite'; allowed: executorch, gguf, onnx, tensorrt"),
    (("bandwidth_gb_s = 17.07", "bandwidth_gb_s = -1"), r"bandwidth_gb_s -1 must be a positive finite number"),
    (("bandwidth_gb_s = 17.07", "bandwidht_gb_s = 17.07"), r"missing field 'bandwidth_gb_s'"),
    (("cores = 4", "cores = 4\ncolor = 'red'"), r"unknown field 'color'; allowed: name, kind"),
    (('transport = "ssh://pi@raspberrypi.local"', 'transport = "telnet://pi"'), r"transport 'telnet://pi'; allowed"),
    (("fp16 = 0.3072", "fp64 = 0.3072"), r"peak compute precision 'fp64'; allowed: fp32, fp16, bf16, int8, int4"),
])
def test_bad_profile_one_line(tmp_path, edit, match):
    # setup
    path = tmp_path / "bad.toml"
    assert edit[0] in GOOD
    path.write_text(GOOD.replace(edit[0], edit[1]))
    # execute / assert
    with pytest.raises(EdgesmithError, match=match) as e:
        load_profile(str(path))
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_local_profile_is_measured_once_and_cached(monkeypatch, tmp_path):
    # setup
    monkeypatch.setenv("EDGESMITH_CACHE", str(tmp_path))
    first = load_profile("local")

    def refuse(*args, **kwargs):
        raise AssertionError("measured again instead of reading the cache")

    monkeypatch.setattr("devices.measure.measure_bandwidth", refuse)
    monkeypatch.setattr("devices.measure.measure_matmul_flops", refuse)
    # execute
    second = load_profile("local")
    # assert
    cached = json.loads((tmp_path / "devices" / "local.json").read_text())
    assert second.bandwidth_bytes_s == first.bandwidth_bytes_s == cached["bandwidth_bytes_s"] > 1e8
    assert first.cores == cpu_cores()
    assert first.ram_bytes > 1 << 28 and "gguf" in first.formats
