"""The text-to-image path (gendd.backbone.text) on a tiny random-init Stable-Diffusion-shaped backbone: a byte-level
CLIP vocabulary written here, a 2-layer CLIP text model, a small UNet2DConditionModel and an RGB VAE (no download)."""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_close_f32, ddim_roundtrip_error, make_dataset
from gendd.backbone.text import LUMA, TextBackbone, class_prompts, tiny_text_backbone, write_byte_vocabulary
from gendd.errors import ConfigError

WNIDS = ("n01440764", "n02102040")  # tench, English springer


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
    return write_byte_vocabulary(tmp_path_factory.mktemp("vocab"))


@pytest.fixture(scope="module")
def tiny_t2i(vocab_dir):
    return tiny_text_backbone(image_size=16, vocabulary=vocab_dir)


@pytest.fixture(scope="module")
def sd_folder(tiny_t2i, tmp_path_factory):
    path = tmp_path_factory.mktemp("sd") / "tiny-sd"
    tiny_t2i.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def wnid_folder(tmp_path_factory):
    """An ImageFolder whose classes are ImageNet WNIDs (RGB, 16 px, 4 training images per class)."""
    root = tmp_path_factory.mktemp("data") / "wnids"
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2)):
        for k, c in enumerate(WNIDS):
            (root / split / c).mkdir(parents=True)
            for i in range(count):
                arr = (rng.random((16, 16, 3)) * 80 + 100 * k).astype(np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{i}.png")
    return root


def gendd(*args):
    return subprocess.run([sys.executable, "-m", "gendd", *map(str, args)], capture_output=True, text=True)


def _digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.png"))}


def _distill(method, out, root, backbone, *sets):
    return gendd("distill", method, "--data", "imagefolder", "--data-root", root, "--ipc", "2", "--out", out,
                 "--backbone", backbone, "--quiet", *[a for s in sets for a in ("--set", s)])


# ---------------------------------------------------------------------------------------------- prompts
def test_prompt_templates():
    assert class_prompts(list(WNIDS), None) == ["tench", "English springer"]
    assert class_prompts(list(WNIDS), "{names}")[0] == "tench, Tinca tinca"
    assert class_prompts(["ankle_boot"], "a photo of a {name}") == ["a photo of a ankle boot"]
    assert class_prompts(["n01440764"], "{wnid}") == ["n01440764"]
    with pytest.raises(ConfigError, match="prompt template"):
        class_prompts(["a"], "{nme}")


def test_bound_backbone_prompts_and_negative_prompt(tiny_t2i):
    ds = make_dataset(num_classes=3, size=12)
    bb = tiny_t2i.for_dataset(ds, prompt="{name} photo", negative_prompt="cartoon")
    assert bb.prompts == ["c0 photo", "c1 photo", "c2 photo"] and bb.num_classes == 3
    assert bb.content_hash() == tiny_t2i.content_hash()  # prompts are the method's options, not the backbone's
    emb = tiny_t2i.encode_prompts(["c1 photo", "cartoon"])
    assert torch.equal(bb._embeds[1], emb[0]) and torch.equal(bb._embeds[3], emb[1])  # row K: CFG's unconditional
    plain = tiny_t2i.for_dataset(ds)
    assert torch.equal(plain._embeds[3], tiny_t2i.encode_prompts([""])[0])  # no negative prompt: the empty one
    with pytest.raises(ConfigError, match="no prompt"):
        tiny_t2i.predict(torch.zeros(1, *tiny_t2i.latent_shape), torch.tensor([5]), torch.tensor([0]))


def test_cfg_scale_one_is_the_conditional_prediction(tiny_t2i):
    bb = tiny_t2i.for_dataset(make_dataset(num_classes=3, size=12))
    g = torch.Generator().manual_seed(0)
    z, y, t = torch.randn((3, *bb.latent_shape), generator=g), torch.tensor([0, 2, 1]), torch.tensor([900, 500, 20])
    with torch.no_grad():
        eps, v = bb.predict(z, t, y, cfg_scale=1.0)
        assert v is None
        assert torch.equal(eps, bb.model_output(z, t, y))  # s = 1: one conditional pass, nothing else
    with torch.no_grad():
        c, u = bb.model_output(z, t, y), bb.model_output(z, t, torch.full_like(y, bb.null_label))
        eps8, _ = bb.predict(z, t, y, cfg_scale=8.0)
    # predict runs one batch of 6 ([z, z]); c and u are batches of 3: float32 rounding of a UNet forward, whose
    # reductions along the path sum to about 10^4 (16 convolutions of 9 x 4..64 input channels, the time MLP,
    # attention over up to 256 tokens), amplified by the guidance combination (|1 - s| + |s| = 15)
    amp = 15 * max(float(c.abs().max()), float(u.abs().max()))
    assert_close_f32(eps8, u + 8.0 * (c - u), n=10_000, scale=amp)


# ---------------------------------------------------------------------------------------------- geometry
def test_grayscale_enters_as_three_equal_channels_and_leaves_as_luma(tiny_t2i):
    ds = make_dataset(num_classes=2, size=12, channels=1)
    bb = tiny_t2i.for_dataset(ds)
    x = torch.rand(2, 1, 12, 12) * 2 - 1
    assert torch.equal(bb.encode(x), bb.encode(x.expand(-1, 3, -1, -1)))
    z = bb.encode(x)
    assert z.shape == (2, *bb.latent_shape) and bb.decode(z).shape == (2, 1, 12, 12)
    rgb = torch.tensor([0.5, -0.25, 1.0]).view(1, 3, 1, 1).expand(1, 3, 12, 12)
    gray = bb.from_vae_images(rgb)
    expected = sum(w * c for w, c in zip(LUMA, (0.5, -0.25, 1.0)))
    assert gray.shape == (1, 1, 12, 12) and torch.allclose(gray, torch.full_like(gray, expected), atol=1e-6)
    g = bb.geometry()
    assert g["vae_side"] == 16 and g["output_side"] == 12 and "luma" in g["channels_out"]


# ---------------------------------------------------------------------------------------------- analytic denoiser
class _AnalyticUNet(torch.nn.Module):
    """The exact prediction for latents ``x0 ~ N(mu, s^2 I)`` (as tests/test_backbone.py's AnalyticBackbone), as
    a UNet would return it: ``eps*(x_t) = sqrt(1 - abar) (x_t - sqrt(abar) mu) / (abar s^2 + 1 - abar)``, or
    ``v* = sqrt(abar) eps* - sqrt(1 - abar) x0*`` for a v-prediction model."""

    def __init__(self, alphas_cumprod, mu, s, channels, prediction_type):
        super().__init__()
        self.config = SimpleNamespace(in_channels=channels, out_channels=channels, sample_size=mu.shape[-1])
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.abar_all, self.mu, self.s, self.kind = alphas_cumprod.float(), mu, s, prediction_type

    def forward(self, z, t, encoder_hidden_states):
        abar = self.abar_all[t.long()].view(-1, 1, 1, 1)
        eps = (1 - abar).sqrt() * (z - abar.sqrt() * self.mu) / (abar * self.s ** 2 + 1 - abar)
        if self.kind == "v_prediction":
            x0 = (z - (1 - abar).sqrt() * eps) / abar.sqrt()
            eps = abar.sqrt() * eps - (1 - abar).sqrt() * x0
        return SimpleNamespace(sample=eps)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_inversion_then_sampling_reconstructs(tiny_t2i, prediction_type):
    mu = torch.randn(tiny_t2i.latent_shape, generator=torch.Generator().manual_seed(3)) * 0.5
    cfg = {**tiny_t2i.scheduler_config, "prediction_type": prediction_type}
    unet = _AnalyticUNet(tiny_t2i.alphas_cumprod, mu, 0.8, tiny_t2i.latent_channels, prediction_type)
    bb = TextBackbone(tiny_t2i.vae, unet, tiny_t2i.text_encoder, tiny_t2i.tokenizer, cfg, tiny_t2i.meta)
    bb = bb.for_dataset(make_dataset(num_classes=2, size=12))
    z0 = mu + 0.8 * torch.randn((6, *bb.latent_shape), generator=torch.Generator().manual_seed(4))
    y = torch.zeros(6, dtype=torch.long)
    errors = {steps: ddim_roundtrip_error(bb, z0, y, steps) for steps in (10, 50)}
    # the O(1/N) of inversion's eps(x_{t_{i+1}}, t_i) ~ eps(x_{t_i}, t_i), as on the DiT path
    assert errors[50] < 0.05 and errors[50] < errors[10] / 3


# ---------------------------------------------------------------------------------------------- methods, end to end
@pytest.mark.parametrize("method,sets", [
    ("dit", ["num_steps=4"]),
    ("mgd3", ["num_steps=4", "flip_augment=false"]),
    ("d4m", ["num_steps=4"]),
    ("d3hr", ["num_steps=4", "inversion_steps=2", "num_candidates=8"]),
])
def test_cli_distills_with_a_stable_diffusion_folder(sd_folder, wnid_folder, tmp_path, method, sets):
    out = tmp_path / method
    r = _distill(method, out, wnid_folder, sd_folder, *sets)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["geometry"]["vae_side"] == 16
    expected = ["tench, Tinca tinca", "English springer, English springer spaniel"] if method == "d4m" \
        else ["tench", "English springer"]
    assert manifest["resolved"]["prompts"] == expected and manifest["resolved"]["cfg_scale"] == 8.0
    if method == "d4m":
        assert manifest["resolved"]["negative_prompt"] == "cartoon, anime, painting"
    pngs = sorted(out.glob("*/*.png"))
    assert len(pngs) == 4 and all(Image.open(p).size == (manifest["geometry"]["output_side"],) * 2 for p in pngs)


def test_mgd3_without_guidance_is_plain_text_to_image_sampling_bit_for_bit(sd_folder, wnid_folder, tmp_path):
    a = _distill("dit", tmp_path / "dit", wnid_folder, sd_folder, "num_steps=4")
    b = _distill("mgd3", tmp_path / "mgd3", wnid_folder, sd_folder, "num_steps=4", "mode_guidance_scale=0")
    c = _distill("dit", tmp_path / "dit2", wnid_folder, sd_folder, "num_steps=4")
    assert a.returncode == b.returncode == c.returncode == 0, a.stderr + b.stderr + c.stderr
    assert _digests(tmp_path / "dit") == _digests(tmp_path / "mgd3")
    assert _digests(tmp_path / "dit") == _digests(tmp_path / "dit2")  # the same seed, the same images
    from safetensors.torch import load_file

    for name in WNIDS:
        za, zb = (load_file(str(tmp_path / m / "latents" / f"{name}.safetensors")) for m in ("dit", "mgd3"))
        assert torch.equal(za["latents"], zb["latents"])


def test_d4m_strength_zero_returns_the_decoded_prototypes(tiny_t2i, tmp_path):
    from gendd.cache import LatentCache
    from gendd.data.base import to_uint8
    from gendd.methods import ClassContext, build_method

    ds = make_dataset(num_classes=2, per_class=5, size=12)
    method = build_method("d4m", strength=0.0, num_steps=4)
    bb = method.condition(ds, tiny_t2i)
    cache = LatentCache.build(ds, bb, tmp_path / "cache", method.encode_spec(), progress=False)
    ctx = ClassContext.create(ds, 1, 2, 0, backbone=bb, cache=cache)
    res = method.distill_class(ctx)
    assert torch.equal(res.latents, res.tensors["prototypes"])
    protos = method.prototypes(ClassContext.create(ds, 1, 2, 0, backbone=bb, cache=cache)).modes
    assert torch.equal(to_uint8(bb.decode(res.latents)), to_uint8(bb.decode(protos)))


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("missing", ["text_encoder", "tokenizer"])
def test_a_missing_text_encoder_or_tokenizer_is_one_clear_error(sd_folder, wnid_folder, tmp_path, missing):
    broken = tmp_path / "broken-sd"
    shutil.copytree(sd_folder, broken)
    shutil.rmtree(broken / missing)
    out = tmp_path / "o"
    r = _distill("dit", out, wnid_folder, broken, "num_steps=2")
    assert r.returncode == 2 and not out.exists()
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and f"no {missing}/ folder" in lines[0], r.stderr


def test_fine_tuning_methods_and_prompts_are_refused_where_they_do_not_apply(sd_folder, wnid_folder, tmp_path):
    r = _distill("minimax", tmp_path / "m", wnid_folder, sd_folder)
    assert r.returncode == 2 and "cannot be fine-tuned" in r.stderr and not (tmp_path / "m").exists()
    r = gendd("distill", "dit", "--ipc", "1", "--out", tmp_path / "p", "--set", "prompt=a {name}", "--set",
              "num_steps=2", "--quiet")  # the shipped class-conditional DiT
    assert r.returncode == 2 and "apply to text-to-image backbones" in r.stderr and not (tmp_path / "p").exists()
    r = _distill("dit", tmp_path / "t", wnid_folder, sd_folder, "prompt={nme}")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "prompt template" in r.stderr
    assert not (tmp_path / "t").exists()


def test_d3hr_statistics_are_keyed_by_the_prompt(tiny_t2i, tmp_path):
    from gendd.cache import LatentCache
    from gendd.methods import ClassContext, build_method

    ds = make_dataset(num_classes=2, per_class=4, size=12)
    method = build_method("d3hr", num_steps=4, inversion_steps=2, num_candidates=4)
    cache = LatentCache.build(ds, tiny_t2i, tmp_path / "cache", method.encode_spec(), progress=False)
    stats = {}
    for template in ("{name}", "a photo of {name}"):
        bb = build_method("d3hr", prompt=template).condition(ds, tiny_t2i)
        ctx = ClassContext.create(ds, 0, 1, 0, backbone=bb, cache=cache)
        stats[template] = method.class_statistics(ctx, ctx.class_latents())
    assert len(list(Path(cache.root).glob("d3hr-*.safetensors"))) == 2  # one inversion per prompt, not a stale reuse
    assert not torch.equal(stats["{name}"][0], stats["a photo of {name}"][0])


def test_a_hub_id_is_read_from_the_local_cache_only(sd_folder, tmp_path):
    import os

    snapshot = tmp_path / "hub" / "models--someone--tiny-sd" / "snapshots" / "0123abcd"
    shutil.copytree(sd_folder, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    run = lambda repo: subprocess.run([sys.executable, "-m", "gendd", "backbone", "info", repo],  # noqa: E731
                                      capture_output=True, text=True, env=env)
    r = run("someone/tiny-sd")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["kind"] == "text-to-image"
    r = run("someone/not-cached")
    assert r.returncode == 2 and r.stderr.startswith("error: backbone 'someone/not-cached' is neither a folder")
