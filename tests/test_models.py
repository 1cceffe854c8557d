"""Model presets, the builtin tiny LTX-2 model, and resolving/loading weights (local dirs, S3 via moto)."""

from __future__ import annotations

import math
import shutil
import threading
import time
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from imagine.models import loading, tiny
from imagine.models.loading import ModelSourceError, load_components, resolve_model_dir
from imagine.models.presets import (
    PRESETS,
    ModelPreset,
    UnknownModelError,
    get_preset,
    list_presets,
)
from imagine.models.tiny_grounding import ensure_tiny_grounding

ALL_COMPONENTS = ["audio_vae", "connectors", "scheduler", "text_encoder", "tokenizer", "transformer", "vae", "vocoder"]
MODULES = ["audio_vae", "connectors", "text_encoder", "transformer", "vae", "vocoder"]


# --- presets -------------------------------------------------------------------------------------------------------


def test_presets_registry():
    assert {"tiny", "ltx-2"} <= set(PRESETS)
    assert get_preset("tiny").source == "builtin:tiny"
    assert [p.name for p in list_presets()] == list(PRESETS)
    assert get_preset("tiny").default_fps == 24
    assert get_preset("ltx-2").max_duration_s == 15
    # the edit path's grounding models are presets like any other, built / fetched / loaded by the same loader
    assert [p.name for p in list_presets("grounding")] == ["tiny-grounding", "grounding"]
    assert get_preset("tiny-grounding").source == "builtin:tiny-grounding" and get_preset("tiny-grounding").is_builtin
    assert loading.BUILTIN_BUILDERS["builtin:tiny-grounding"] is ensure_tiny_grounding


def test_unknown_preset_names_known_ones():
    with pytest.raises(UnknownModelError) as info:
        get_preset("nope")
    assert isinstance(info.value, KeyError)
    assert "nope" in str(info.value) and "tiny" in str(info.value) and "ltx-2" in str(info.value)


def test_preset_is_strict():
    with pytest.raises(ValueError, match="extra"):
        ModelPreset(name="x", family="ltx2", source="/m", unknown_field=1)
    with pytest.raises(ValueError, match="builtin"):
        ModelPreset(name="x", family="ltx2", source="builtin:huge")
    with pytest.raises(ValueError, match="family"):
        ModelPreset(name="x", family="sd", source="/m")
    with pytest.raises(ValueError, match="'grounding' model"):
        ModelPreset(name="x", family="ltx2", source="builtin:tiny-grounding")


# --- tiny model ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> dict:
    return load_components(tiny_model_dir, ALL_COMPONENTS, "cpu", torch.float32)


def test_tiny_keeps_real_ltx2_ratios(loaded):
    vae, audio_vae, vocoder = loaded["vae"], loaded["audio_vae"], loaded["vocoder"]
    assert vae.spatial_compression_ratio == 32
    assert vae.temporal_compression_ratio == 8
    assert audio_vae.mel_compression_ratio == 4
    assert audio_vae.temporal_compression_ratio == 4
    # vocoder turns one mel frame into hop_length samples at its output rate
    config = audio_vae.config
    hop_at_output = config.mel_hop_length * vocoder.config.output_sampling_rate // config.sample_rate
    assert math.prod(vocoder.config.upsample_factors) == hop_at_output
    # audio latents_mean/std cover the packed (channels x latent mel bins) features, as in LTX-2
    latent_mel = audio_vae.config.mel_bins // audio_vae.mel_compression_ratio
    assert audio_vae.latents_mean.numel() == audio_vae.config.latent_channels * latent_mel
    assert loaded["transformer"].config.audio_in_channels == audio_vae.config.latent_channels * latent_mel


def test_tiny_vae_shapes_are_real(loaded):
    vae = loaded["vae"]
    with torch.no_grad():
        latents = vae.encode(torch.zeros(1, 3, 17, 64, 96)).latent_dist.mode()
        assert tuple(latents.shape[2:]) == (3, 2, 3)
        assert tuple(vae.decode(latents).sample.shape) == (1, 3, 17, 64, 96)


def test_tiny_build_is_seeded_and_round_trips_bit_identical(loaded):
    fresh = tiny.build_tiny_components()  # a second, independent build
    for name in MODULES:
        saved = fresh[name].state_dict()
        reloaded = loaded[name].state_dict()
        assert saved.keys() == reloaded.keys(), name
        for key in saved:
            assert torch.equal(saved[key], reloaded[key]), f"{name}.{key}"
    assert fresh["tokenizer"]("a robot").input_ids == loaded["tokenizer"]("a robot").input_ids


def test_build_is_idempotent_and_single_under_concurrency(tmp_path, monkeypatch):
    builds = []

    def fake_save(target_dir: Path) -> Path:
        builds.append(target_dir)
        time.sleep(0.2)  # widen the race window: the other builder must wait on the lock, then see the result
        (Path(target_dir) / "model_index.json").write_text("{}")
        return Path(target_dir)

    monkeypatch.setattr(tiny, "save_tiny_ltx2", fake_save)
    target = tmp_path / "models" / "tiny-x"
    barrier = threading.Barrier(3)
    results, errors = [], []

    def build():
        barrier.wait()
        try:
            results.append(tiny.build_tiny_ltx2(target))
        except Exception as e:  # surfaced by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == [target] * 3
    assert len(builds) == 1
    assert (target / "model_index.json").is_file()
    assert not [p for p in target.parent.iterdir() if ".tmp-" in p.name]  # temp dir renamed away
    assert tiny.build_tiny_ltx2(target) == target and len(builds) == 1


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    def broken_save(target_dir: Path) -> Path:
        (Path(target_dir) / "half-written").write_text("x")
        raise RuntimeError("disk full")

    monkeypatch.setattr(tiny, "save_tiny_ltx2", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        tiny.build_tiny_ltx2(tmp_path / "tiny")
    assert not (tmp_path / "tiny").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


# --- resolve / load ------------------------------------------------------------------------------------------------


def test_resolve_builtin_uses_hashed_home_dir(tmp_path, tiny_model_dir):
    expected = tmp_path / "models" / f"tiny-{tiny.tiny_config_hash()}"
    shutil.copytree(tiny_model_dir, expected)  # pre-seed: resolving must reuse it, not rebuild
    assert resolve_model_dir(get_preset("tiny"), tmp_path) == expected


def test_resolve_local_dir(tmp_path, tiny_model_dir):
    preset = ModelPreset(name="local", family="ltx2", source=str(tiny_model_dir))
    assert resolve_model_dir(preset, tmp_path) == tiny_model_dir

    missing = ModelPreset(name="local", family="ltx2", source=str(tmp_path / "absent"))
    with pytest.raises(ModelSourceError, match="does not exist"):
        resolve_model_dir(missing, tmp_path)

    (tmp_path / "empty").mkdir()
    empty = ModelPreset(name="local", family="ltx2", source=str(tmp_path / "empty"))
    with pytest.raises(ModelSourceError, match="model_index.json"):
        resolve_model_dir(empty, tmp_path)


def test_load_components_rejects_unknown_name(tiny_model_dir):
    with pytest.raises(ValueError, match="unet"):
        load_components(tiny_model_dir, ["unet"], "cpu", torch.float32)


def test_resolve_s3_downloads_once_and_loads(tmp_path, tiny_model_dir, s3_server, loaded):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket="weights")
    for path in tiny_model_dir.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), "weights", f"ltx/tiny/{path.relative_to(tiny_model_dir).as_posix()}")
    client.put_object(Bucket="weights", Key="ltx/tiny-other/model_index.json", Body=b"{}")  # sibling prefix

    preset = ModelPreset(name="s3", family="ltx2", source="s3://weights/ltx/tiny/")
    model_dir = resolve_model_dir(preset, tmp_path, endpoint_url=s3_server)
    assert model_dir == tmp_path / "models" / "s3" / "weights" / "ltx" / "tiny"
    assert sorted(p.relative_to(model_dir) for p in model_dir.rglob("*") if p.is_file()) == sorted(
        p.relative_to(tiny_model_dir) for p in tiny_model_dir.rglob("*") if p.is_file()
    )
    transformer = load_components(model_dir, ["transformer"], "cpu", torch.float32)["transformer"]
    for key, value in loaded["transformer"].state_dict().items():
        assert torch.equal(value, transformer.state_dict()[key])

    client.delete_object(Bucket="weights", Key="ltx/tiny/model_index.json")
    assert resolve_model_dir(preset, tmp_path, endpoint_url=s3_server) == model_dir  # cached: no second download

    bad = ModelPreset(name="s3", family="ltx2", source="s3://weights/ltx/tiny/")
    with pytest.raises(ModelSourceError, match="model_index.json"):
        resolve_model_dir(bad, tmp_path / "fresh-home", endpoint_url=s3_server)


def test_parse_s3_uri():
    assert loading.parse_s3_uri("s3://b/a/c/") == ("b", "a/c")
    assert loading.parse_s3_uri("s3://b") == ("b", "")
    with pytest.raises(ValueError, match="source"):
        loading.parse_s3_uri("http://b/a")


@pytest.mark.parametrize("key", ["../../../escape.txt", "sub/../../escape.txt", "/abs/escape.txt", "a//b.txt"])
def test_s3_model_keys_leaving_the_model_directory_are_refused(tmp_path, s3_server, key):
    """A bucket others can write must not write outside the cache: keys with `..`, a leading `/` or an empty part
    under the model's prefix refuse the download (and nothing lands outside the model directory)."""
    import boto3

    bucket = f"evil-{abs(hash(key)) % 10**8}"
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket=bucket)
    client.put_object(Bucket=bucket, Key="m/model_index.json", Body=b"{}")
    client.put_object(Bucket=bucket, Key=f"m/{key}", Body=b"pwned")
    preset = ModelPreset(name="s3", family="ltx2", source=f"s3://{bucket}/m")
    with pytest.raises(ModelSourceError, match="refusing object key"):
        resolve_model_dir(preset, tmp_path / "home", endpoint_url=s3_server)
    assert not [p for p in tmp_path.rglob("escape.txt")] and not [p for p in tmp_path.rglob("b.txt")]


# --- loading straight onto the device, and the weights a sampler reads --------------------------------------------


class _Recorded(torch.nn.Module):
    """A module class whose `from_pretrained` records its keyword arguments."""

    calls: ClassVar[list[dict]] = []

    @classmethod
    def from_pretrained(cls, path: str, **kwargs):
        cls.calls.append(kwargs)
        return cls()


@pytest.mark.parametrize(
    ("device", "device_map"),
    [("cpu", None), ("cuda:1", torch.device("cuda:1")), ("cuda", torch.device("cuda")), ("mps", torch.device("mps"))],
)
def test_modules_load_straight_onto_a_device_off_the_cpu(tmp_path, monkeypatch, device, device_map):
    """Off the CPU each module's `from_pretrained` gets `device_map=<device>` (a torch.device: transformers reads
    the string "cuda" as "cuda:$LOCAL_RANK"), in diffusers' and transformers' dtype spelling; on the CPU no
    device_map (loaded, then `.to`)."""
    (tmp_path / "model_index.json").write_text('{"a": ["diffusers", "A"], "b": ["transformers", "B"]}')
    monkeypatch.setattr(loading, "_component_class", lambda library, name: _Recorded)
    monkeypatch.setattr(_Recorded, "calls", [])
    loaded = load_components(tmp_path, ["a", "b"], device, torch.bfloat16)
    placement = {} if device_map is None else {"device_map": device_map}
    assert _Recorded.calls == [
        {"subfolder": "a", "torch_dtype": torch.bfloat16, **placement},
        {"subfolder": "b", "dtype": torch.bfloat16, **placement},
    ]
    assert not any(module.training for module in loaded.values())


@pytest.mark.parametrize("source", ["builtin:tiny", "builtin:tiny-vace", "builtin:tiny-grounding"])
def test_device_map_loading_equals_loading_then_moving(tmp_path, monkeypatch, source):
    """The device_map path of diffusers and transformers, run on the CPU, loads every module of the three builtin
    models (weights and buffers, in bfloat16) exactly as loading on the CPU does."""
    import json

    model_dir = loading.BUILTIN_BUILDERS[source](tmp_path)
    index = json.loads((model_dir / "model_index.json").read_text())
    names = [name for name, entry in index.items() if isinstance(entry, list) and entry[0] is not None]
    plain = load_components(model_dir, names, "cpu", torch.bfloat16)
    monkeypatch.setattr(loading, "device_map", lambda device: torch.device("cpu"))
    mapped = load_components(model_dir, names, "cpu", torch.bfloat16)
    modules = [name for name in names if isinstance(plain[name], torch.nn.Module)]
    assert modules
    for name in modules:
        for tensors in (lambda m: m.state_dict(), lambda m: dict(m.named_buffers())):
            expected, got = tensors(plain[name]), tensors(mapped[name])
            assert expected.keys() == got.keys(), name
            for key in expected:
                assert expected[key].dtype == got[key].dtype and torch.equal(expected[key], got[key]), f"{name}.{key}"
        assert not mapped[name].training


def test_rank_setup_timeout_counts_the_weights_the_sampler_loads(tmp_path):
    """The auto timeout of a parallel pool reads the sizes of its sampler's weight files (transformer, VAEs; not
    the text encoder's or the vocoder's), resolving the model directory first; an explicit value wins."""
    from imagine.config import AppConfig
    from imagine.pipeline.denoise import DENOISER_COMPONENTS
    from imagine.serving.samplers import pool_setup_timeout_s, weight_bytes

    config = AppConfig.model_validate({"home": str(tmp_path), "denoiser_variants": {"sp2": {"parallel": {"sequence": 2}}}})
    auto = pool_setup_timeout_s(config, "sp2")  # builds the builtin tiny model under home, as a replica would
    model_dir = tiny.ensure_tiny_ltx2(tmp_path)
    files = {
        name: sum(f.stat().st_size for f in (model_dir / name).glob("*.safetensors"))
        for name in ("transformer", "vae", "audio_vae", "text_encoder", "vocoder")
    }
    assert all(files.values()), files
    sampler = files["transformer"] + files["vae"] + files["audio_vae"]
    assert weight_bytes(model_dir, DENOISER_COMPONENTS) == sampler
    assert weight_bytes(model_dir, ["text_encoder"]) == files["text_encoder"]
    assert weight_bytes(model_dir, ["scheduler"]) == 0  # no weights, only a config
    assert auto == pytest.approx(120.0 + 10.0 * sampler / 2**30)
    config.denoiser_variants["sp2"].parallel.setup_timeout_s = 42.0
    assert pool_setup_timeout_s(config, "sp2") == 42.0
