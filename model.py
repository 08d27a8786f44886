"""DINO ViT-S/8, hand-written (after facebookresearch/dino vision_transformer.py), its pretrained-weight loader, and
the one checkpoint format every script uses.

    model = load_pretrained("facebook/dino-vits8", img_size=80, num_classes=2)   # Hub id, local file or folder
    logits = model(x)                                   # x: float [B, 3, H, W], ImageNet-normalised, H, W % 8 == 0
    attn = model.get_last_selfattention(x)              # [B, heads, T, T] softmax probabilities, T = 1 + H*W/64
    save_checkpoint("runs/x/best.safetensors", model, meta={"epoch": 3}, state={"optimizer": opt.state_dict()})
    model, meta, state = load_checkpoint("runs/x/best.safetensors")

Module names follow DINO/timm (`blocks.0.attn.qkv`, ...) so their state dicts load as they are; the transformers
layout (`encoder.layer.0.attention.attention.query`, ...) is renamed on load.
"""

import json
import math
import os
import pickle  # only for its exception type: pickles are read by torch.load(weights_only=True)
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import huggingface_hub
import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub import errors as hub_errors
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

import run
from configurator import UserError


@dataclass
class ViTConfig:
    img_size: int = 224  # the position embedding holds (img_size // patch_size)**2 patches; other sizes interpolate
    patch_size: int = 8
    dim: int = 384
    depth: int = 12
    heads: int = 6
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    ln_eps: float = 1e-6  # DINO/timm; transformers' facebook/dino-vits8 says 1e-12 (load_pretrained takes the source's)
    drop_path: float = 0.0  # stochastic depth of the last block, linear from 0 at the first (DINO)
    num_classes: int = 0  # 0: no head, forward returns the CLS feature
    pos_interp: str = "dino"  # "dino" or "size", see resize_pos_embed


PRESETS = {
    "vit_small_patch8": ViTConfig(),  # DINO ViT-S/8: 21.7M parameters, 785 tokens at 224
    "vit_tiny": ViTConfig(img_size=80, dim=192, depth=4, heads=3),  # DeiT-Ti width, 4 blocks (the demo narrows it)
}


# ----------------------------------------------------------------------------------------------------------------
# the model


def resize_pos_embed(pos_embed, grid, mode="dino"):
    """Resize a position embedding [1, 1 + n*n, D] (CLS first, square n x n grid) to grid = (h, w) patches, bicubic.

    mode="dino" (the default, ViTConfig.pos_interp): DINO's F.interpolate(scale_factor=(h + 0.1) / n); the +0.1
      makes floor(n * scale) land on h (DINO issue #8). PyTorch samples with the given scale, not h / n, so the
      result differs slightly from "size". This is what DINO itself does at any resolution.
    mode="size": F.interpolate(size=(h, w)), as transformers' ViTEmbeddings.interpolate_pos_encoding does (and as
      timm does, except that timm also antialiases when it shrinks a checkpoint's grid at load time).
    """
    n = math.isqrt(pos_embed.shape[1] - 1)
    if n * n != pos_embed.shape[1] - 1:
        raise ValueError(f"position embedding of {pos_embed.shape[1]} tokens is not 1 + a square grid")
    if (n, n) == tuple(grid):
        return pos_embed
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    patch_pos = patch_pos.reshape(1, n, n, -1).permute(0, 3, 1, 2).float()  # bicubic wants fp32 on every device
    if mode == "dino":
        patch_pos = F.interpolate(patch_pos, scale_factor=((grid[0] + 0.1) / n, (grid[1] + 0.1) / n), mode="bicubic")
    elif mode == "size":
        patch_pos = F.interpolate(patch_pos, size=tuple(grid), mode="bicubic")
    else:
        raise ValueError(f"pos_interp must be 'dino' or 'size', got {mode!r}")
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1).to(pos_embed.dtype)
    return torch.cat([cls_pos, patch_pos], dim=1)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):  # [B, 3, H, W] -> [B, H*W / p^2, dim], patches in row-major order
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=cfg.qkv_bias)  # one fused matmul, rows ordered q, k, v
        self.proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x, return_attention=False):
        B, T, C = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        if return_attention:  # explicit softmax (DINO's path), only to hand the probabilities out
            attn = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)
            x = attn @ v
        else:  # same math in a fused kernel (flash / memory-efficient attention on GPU)
            attn = None
            x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, T, C)), attn


class Mlp(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc1 = nn.Linear(cfg.dim, int(cfg.dim * cfg.mlp_ratio))
        self.act = nn.GELU()  # exact erf GELU, as DINO, timm and transformers ("gelu")
        self.fc2 = nn.Linear(int(cfg.dim * cfg.mlp_ratio), cfg.dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: in training, drop a residual branch for whole samples, rescale the samples that keep it."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty(x.shape[0], *(1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)

    def extra_repr(self):
        return f"p={self.p}"


class Block(nn.Module):
    def __init__(self, cfg, drop_path):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.mlp = Mlp(cfg)
        self.drop_path = DropPath(drop_path)

    def forward(self, x, return_attention=False):  # pre-norm residual block
        y, attn = self.attn(self.norm1(x), return_attention)
        if return_attention:
            return attn
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


def _init_weights(m):  # DINO: trunc-normal(0.02) Linear weights, zero biases; LayerNorm keeps PyTorch's 1/0,
    if isinstance(m, nn.Linear):  # the patch conv PyTorch's default
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class ViT(nn.Module):
    arch = "vit"

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        if cfg.img_size % cfg.patch_size or cfg.dim % cfg.heads or cfg.pos_interp not in ("dino", "size"):
            raise UserError(f"bad {cfg}: needs img_size % patch_size == dim % heads == 0, pos_interp 'dino' or 'size'")
        self.cfg = cfg
        n = cfg.img_size // cfg.patch_size
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + n * n, cfg.dim))
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # linear, 0 at the first block
        self.blocks = nn.ModuleList(Block(cfg, p) for p in rates)
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.head = nn.Linear(cfg.dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    def config_dict(self):
        return asdict(self.cfg)

    def prepare_tokens(self, x):
        B, _, H, W = x.shape
        p = self.cfg.patch_size
        if H % p or W % p:
            raise ValueError(f"input {H}x{W} is not a multiple of the patch size {p}")
        x = torch.cat([self.cls_token.expand(B, -1, -1), self.patch_embed(x)], dim=1)
        return x + resize_pos_embed(self.pos_embed, (H // p, W // p), self.cfg.pos_interp)

    def forward_features(self, x):  # -> [B, dim], the CLS token after the final norm
        x = self.prepare_tokens(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x[:, 0])  # LayerNorm is per token: norming CLS alone equals DINO's norm-all-then-pick

    def forward(self, x):
        return self.head(self.forward_features(x))

    def get_last_selfattention(self, x):  # -> [B, heads, T, T]; row 0 = CLS query, columns 1: = patch keys
        x = self.prepare_tokens(x)
        for block in self.blocks[:-1]:
            x = block(x)
        return self.blocks[-1](x, return_attention=True)


# ----------------------------------------------------------------------------------------------------------------
# pretrained weights: Hub id, file or folder; transformers or DINO/timm layout

_HF_RENAMES = [  # transformers ViTModel -> DINO/timm names, in this order ("output.dense" after "attention.output")
    ("embeddings.cls_token", "cls_token"),
    ("embeddings.position_embeddings", "pos_embed"),
    ("embeddings.patch_embeddings.projection", "patch_embed.proj"),
    ("encoder.layer.", "blocks."),
    ("layernorm_before", "norm1"),
    ("layernorm_after", "norm2"),
    ("attention.output.dense", "attn.proj"),
    ("intermediate.dense", "mlp.fc1"),
    ("output.dense", "mlp.fc2"),
    ("layernorm", "norm"),
]
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "backbone.", "vit.")  # DDP, torch.compile, DINO teacher, HF classifier
_HEADS = ("pooler.", "classifier.", "head.")  # never loaded: the new head starts fresh


def _download(repo_id):
    """(weights path, config.json path or None) from the Hub cache, downloading what is missing."""
    get = lambda name: Path(huggingface_hub.hf_hub_download(repo_id, name))
    try:
        try:
            weights = get("model.safetensors")
        except hub_errors.RemoteEntryNotFoundError:  # older repos only have the pickle (read with weights_only=True)
            weights = get("pytorch_model.bin")
        try:
            config = get("config.json")
        except hub_errors.RemoteEntryNotFoundError:
            config = None
    # not cached and no network, or HF_HUB_OFFLINE=1 (OfflineModeIsEnabled is a ConnectionError)
    except (hub_errors.LocalEntryNotFoundError, ConnectionError):
        raise UserError(
            f"the Hugging Face Hub is unreachable (offline or HF_HUB_OFFLINE=1) and {repo_id} is not cached: "
            f"download its model.safetensors (and config.json) elsewhere and pass the local file, e.g. "
            f"load_pretrained('/path/to/model.safetensors')"
        ) from None
    return weights, config


def checkpoint_path(src):
    """A local file as it is; a Hub repo id -> its model.safetensors (or pytorch_model.bin) in the Hub cache."""
    if os.path.exists(src):
        return src
    if not _is_repo_id(src):
        raise UserError(f"no checkpoint file {src} (nor a Hub repo id owner/name)")
    return str(_download(src)[0])


def _is_repo_id(src):
    """'owner/name' (a Hub repo id) as opposed to a path that does not exist."""
    return str(src).count("/") == 1 and not str(src).startswith(("/", ".", "~")) and not Path(src).suffix


def _read_source(src):
    """(state dict with our names, whether it was in the transformers layout, config.json dict or {})."""
    path = Path(src).expanduser()
    if path.is_dir():
        found = [path / f for f in ("model.safetensors", "pytorch_model.bin") if (path / f).is_file()]
        if not found:
            raise UserError(f"{src}: no model.safetensors or pytorch_model.bin in this folder")
        weights, config = found[0], path / "config.json"
    elif path.is_file():
        weights, config = path, path.parent / "config.json"  # transformers keeps config.json beside the weights
    elif not _is_repo_id(src):
        raise UserError(f"{src}: no such file or folder")
    else:
        weights, config = _download(src)
    hub_config = json.loads(config.read_text()) if config is not None and config.is_file() else {}
    if weights.suffix == ".safetensors":
        try:
            sd = load_file(weights)
        except SafetensorError as e:
            raise UserError(f"{weights}: not a readable safetensors file ({e})") from None
        if any(k.startswith("model.") for k in sd):  # one of our checkpoints: its weights, not its resume state,
            sd = {k.removeprefix("model."): v for k, v in sd.items() if k.startswith("model.")}
            with safe_open(weights, framework="pt") as f:  # and its own record of the architecture
                ours = json.loads((f.metadata() or {}).get("model_config", "{}"))
            hub_config = {"num_attention_heads": ours["heads"], "ln_eps": ours["ln_eps"]} if "heads" in ours else {}
    else:  # a pickle: weights_only refuses anything but tensors and plain containers
        try:
            sd = torch.load(weights, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise UserError(f"{weights}: holds Python objects other than tensors, which torch.load(weights_only=True) "
                            "refuses to run; not loaded (convert it to .safetensors where you trust it)") from None
        sd = sd.get("state_dict", sd.get("model", sd))  # training checkpoints nest the weights

    def strip(k):
        while k.startswith(_WRAPPER_PREFIXES):
            k = k.split(".", 1)[1]
        return k

    sd = {strip(k): v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if not k.startswith(_HEADS)}
    hf_layout = any(k.startswith(("embeddings.", "encoder.")) for k in sd)
    if hf_layout:
        for old, new in _HF_RENAMES:
            sd = {k.replace(old, new): v for k, v in sd.items()}
        for q in [k for k in sd if ".attention.attention.query." in k]:  # separate q, k, v -> one fused qkv
            k, v = q.replace("query", "key"), q.replace("query", "value")
            if k in sd and v in sd:
                sd[q.replace("attention.attention.query", "attn.qkv")] = torch.cat([sd.pop(q), sd.pop(k), sd.pop(v)])
    return sd, hf_layout, hub_config


KNOWN_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16}  # width -> heads of ViT-Ti/S/B/L (DeiT, DINO, timm)


def _heads(src, dim, hub_config, overrides):
    """The head count: asked for, else from config.json or our checkpoint's metadata, else the standard ViT of
    that width. The tensors cannot tell it (qkv is dim x 3 dim for any count), so never a guess."""
    heads = overrides.get("heads") or hub_config.get("num_attention_heads") or KNOWN_HEADS.get(dim)
    if not heads:
        raise UserError(f"{src}: cannot tell its number of attention heads (width {dim} is not a standard ViT's, and "
                        f"no config.json or checkpoint metadata says): pass heads=N to load_pretrained")
    return heads


def load_pretrained(src="facebook/dino-vits8", **overrides) -> ViT:
    """A ViT with pretrained backbone weights from a Hub repo id, a .safetensors/.bin/.pth file, or a folder with
    model.safetensors (or pytorch_model.bin) and config.json, or one of our checkpoints. Architecture from the tensors
    (heads: see _heads); LayerNorm eps from config.json's layer_norm_eps in the transformers layout
    (1e-12 when absent, transformers' default), 1e-6 in the DINO/timm layout. overrides set ViTConfig fields, e.g.
    img_size=80 (the position embedding is resized with pos_interp), num_classes=2 (a new, freshly initialised head),
    drop_path=0.1."""
    sd, hf_layout, hub_config = _read_source(src)
    need = ["patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight"]
    if absent := [k for k in need if k not in sd]:
        raise UserError(f"{src}: not a ViT checkpoint in the transformers or DINO/timm layout: no {absent}; "
                        f"keys are like {sorted(sd)[:5]}")
    dim, _, patch, _ = sd["patch_embed.proj.weight"].shape
    cfg = ViTConfig(
        img_size=math.isqrt(sd["pos_embed"].shape[1] - 1) * patch,
        patch_size=patch,
        dim=dim,
        depth=len({k.split(".")[1] for k in sd if k.startswith("blocks.")}),
        heads=_heads(src, dim, hub_config, overrides),
        mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / dim,
        qkv_bias="blocks.0.attn.qkv.bias" in sd,
        ln_eps=hub_config.get("ln_eps", hub_config.get("layer_norm_eps", 1e-12) if hf_layout else 1e-6),
    )
    model = ViT(replace(cfg, **overrides))
    sd["pos_embed"] = resize_pos_embed(sd["pos_embed"].float(), (model.cfg.img_size // patch,) * 2,
                                       model.cfg.pos_interp)

    own = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    missing, unexpected = sorted(own.keys() - sd.keys()), sorted(sd.keys() - own.keys())
    misshaped = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                 if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or misshaped:
        short = lambda names: ", ".join(names[:8]) + (f" (+{len(names) - 8} more)" if len(names) > 8 else "") or "-"
        raise UserError(f"{src}: weights do not fit {model.cfg}: missing keys: {short(missing)}; "
                        f"unexpected keys: {short(unexpected)}; misshaped keys (file vs model): {short(misshaped)}")
    need_finite(src, sd)
    model.load_state_dict(sd, strict=False)  # strict apart from the head, checked above
    return model


def need_finite(src, tensors):
    """UserError naming the weights of `src` that hold inf or nan: such a model scores like a valid one (a constant
    prediction is right for the majority class) and trains into nan, so it is refused on loading."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise UserError(f"{src}: {len(bad)} weight tensors hold inf or nan (first: {bad[0]}); the file is damaged or "
                        "comes from a run that diverged")


# ----------------------------------------------------------------------------------------------------------------
# checkpoints: one .safetensors per save, for every arch. Tensors under "model.<name>" and "state.<path>"; the
# metadata (strings) holds JSON: "arch", "model_config", each meta entry, and "state", the skeleton of the state
# with {"__tensor__": name} where its tensors were, {"__tuple__": [...]} for tuples and {"__dict__": [[k, v], ...]}
# for dicts whose keys are not all strings (optimizer state is keyed by int), so it comes back exactly.

_RESERVED = {"arch", "model_config", "state"}
_MARKERS = {"__tensor__", "__tuple__", "__dict__"}


def _standalone(t):  # safetensors refuses tensors that share memory, and non-contiguous ones: give each its own copy
    return t.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)


def _flatten(obj, path, tensors):
    if isinstance(obj, torch.Tensor):
        name = path if path not in tensors else f"{path}#{len(tensors)}"  # keys "a.b" and a -> b would collide
        tensors[name] = _standalone(obj)
        return {"__tensor__": name}
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_flatten(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not obj.keys() & _MARKERS:
            return {k: _flatten(v, f"{path}.{k}", tensors) for k, v in obj.items()}
        return {"__dict__": [[_flatten(k, path, tensors), _flatten(v, f"{path}.{k}", tensors)] for k, v in obj.items()]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {path} (tensors, dicts, lists, tuples, scalars only)")


def _unflatten(obj, tensors):
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if len(obj) == 1 and obj.keys() <= _MARKERS:
            (marker, value), = obj.items()
            if marker == "__tensor__":
                return tensors[value]
            if marker == "__tuple__":
                return tuple(_unflatten(v, tensors) for v in value)
            return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in value}
        return {k: _unflatten(v, tensors) for k, v in obj.items()}
    return obj


def _unwrap(model):  # the module inside DDP (.module) and torch.compile (._orig_mod)
    while isinstance(model, nn.parallel.DistributedDataParallel) or hasattr(model, "_orig_mod"):
        model = getattr(model, "_orig_mod", None) or model.module
    return model


def resume_state(path, cfg, must_match, master=True):
    """The resume state of path (a last.safetensors), checked against this run's config: keys in must_match (the
    architecture, the optimizer, the data) must equal the saved ones (else one error line naming them); any other
    difference (lr, epochs, ...) is allowed and printed. The saved model's weights come back as state["weights"]."""
    try:
        saved, meta, state = load_checkpoint(path)
    except UserError as e:  # damaged or foreign: say what to do about it
        raise UserError(f"cannot resume from {path} ({e}); delete it to start over, or choose a new "
                        "--out_dir") from None
    if state is None:
        raise UserError(f"{path} holds no resume state; delete it to start over, or choose a new --out_dir")
    before = meta.get("config", {})
    differ = {k: (before[k], v) for k, v in cfg.items() if k in before and before[k] != v}
    if clash := [k for k in must_match if k in differ]:
        raise UserError("cannot resume with a different " + ", ".join(f"{k} (saved {differ[k][0]!r}, now "
                                                                      f"{differ[k][1]!r})" for k in clash))
    if master and (changed := {k: d for k, d in differ.items() if k not in ("resume", "force", "stop_after")}):
        print("resuming with changed config: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
    return {**state, "weights": saved.state_dict()}


def save_checkpoint(path, model, meta: dict | None = None, state: dict | None = None):
    """Write model weights, its arch and config, meta (JSON-able; tuples come back as lists) and state (nested
    tensors/containers/scalars, exact round trip) to one .safetensors file, atomically."""
    model, meta = _unwrap(model), meta or {}
    if clash := meta.keys() & _RESERVED:
        raise ValueError(f"meta keys {sorted(clash)} are reserved")
    tensors = {f"model.{k}": _standalone(v) for k, v in model.state_dict().items()}
    metadata = {"arch": model.arch, "model_config": json.dumps(model.config_dict())}
    metadata |= {k: json.dumps(v) for k, v in meta.items()}
    if state is not None:
        metadata["state"] = json.dumps(_flatten(state, "state", tensors))
    def write(tmp):
        try:
            save_file(tensors, tmp, metadata=metadata)
        except SafetensorError as e:  # its I/O errors (a full disk) come as this: write_atomic takes OSErrors
            raise OSError(str(e).split("Os {")[0].strip(" :(") or "the serializer failed") from None
    run.write_atomic(path, write)


def load_checkpoint(path, device="cpu"):
    """(model on device, meta, state or None) from a save_checkpoint file, or from a Hub repo id holding one as
    model.safetensors (evaluate.py --push_to_hub makes such repos). State tensors stay on the CPU: RNG states must,
    and optimizer.load_state_dict moves its tensors to the parameters' device."""
    path = checkpoint_path(path)
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise UserError(f"{path}: not a checkpoint of ours (not a safetensors file: {e})") from None
    if not metadata.keys() >= {"arch", "model_config"}:
        raise UserError(f"{path}: not a checkpoint of ours (no 'arch' and 'model_config' in its metadata)")
    if metadata["arch"] not in ARCHS:
        raise UserError(f"{path}: unknown arch {metadata['arch']!r}; known: {', '.join(sorted(ARCHS))}")
    weights = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    need_finite(path, weights)
    try:
        model = ARCHS[metadata["arch"]](json.loads(metadata["model_config"]))
        model.load_state_dict(weights)
    except (TypeError, ValueError, RuntimeError) as e:  # unknown config keys; missing, extra or misshaped tensors
        first = str(e).strip().splitlines()[0]
        raise UserError(f"{path}: its {metadata['arch']} config or weights do not fit this code ({first})") from None
    meta = {k: json.loads(v) for k, v in metadata.items() if k not in _RESERVED}
    state = _unflatten(json.loads(metadata["state"]), tensors) if "state" in metadata else None
    return model.to(device), meta, state


# ----------------------------------------------------------------------------------------------------------------
# CNN backbones for train_mixmatch.py: a small from-scratch CNN for CPU runs and torchvision's Wide-ResNet-50-2
# (the original MixMatch gender/mask experiments' choice). Both take the same normalised NCHW input as the ViT.

class SmallCNN(nn.Module):
    """4 stages of conv3x3-BN-ReLU (+2x2 max-pool between stages), global average pooling, linear head.
    Width doubles per stage; at width 16 about 25M MACs per 80x80 image (a quarter of that at 40x40). Global pooling
    makes it work at any input size; img_size tells callers what to feed."""

    arch = "small"

    def __init__(self, img_size=80, num_classes=2, width=16):
        super().__init__()
        self.img_size, self.num_classes, self.width = img_size, num_classes, width
        layers, c_in = [], 3
        for i in range(4):
            c = width * 2**i
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            layers += [nn.MaxPool2d(2)] if i < 3 else [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, num_classes)
        # channels-last (NHWC): oneDNN's CPU conv and max-pool kernels run a training step ~1.4x faster in it
        # (fwd + bwd, 192 images at 40x40, 2 cores), and cuDNN prefers it under autocast
        self.to(memory_format=torch.channels_last)

    def forward(self, x):
        return self.head(self.features(x.contiguous(memory_format=torch.channels_last)))

    def config_dict(self):
        return {"img_size": self.img_size, "num_classes": self.num_classes, "width": self.width}


class WideResNet50(nn.Module):
    """torchvision's wide_resnet50_2 with a fresh `num_classes` fc head. pretrained=True loads torchvision's ImageNet
    weights (downloaded once into the torch hub cache); they are not part of config_dict, so load_checkpoint rebuilds
    the network offline and fills it from the checkpoint."""

    arch = "wrn50_2"

    def __init__(self, img_size=224, num_classes=2, pretrained=False):
        super().__init__()
        import torchvision  # lazy: only this arch needs it

        weights = torchvision.models.Wide_ResNet50_2_Weights.IMAGENET1K_V2 if pretrained else None
        try:
            self.net = torchvision.models.wide_resnet50_2(weights=weights)
        except OSError as e:  # offline (URLError is an OSError) or unwritable cache
            raise UserError(f"cannot get torchvision's ImageNet weights for wide_resnet50_2 ({e}); offline, use "
                            f"--pretrained= (random init) or put {weights.url.rsplit('/', 1)[-1]} in "
                            f"{torch.hub.get_dir()}/checkpoints/") from None
        self.img_size, self.num_classes = img_size, num_classes
        self.net.fc = nn.Linear(self.net.fc.in_features, num_classes)

    def forward(self, x):
        return self.net(x)

    def config_dict(self):
        return {"img_size": self.img_size, "num_classes": self.num_classes}


# every arch a checkpoint can hold. The protocol: the class has an `arch` name and a `config_dict()` whose items
# are its constructor's keyword arguments, so load_checkpoint rebuilds it from the metadata alone.
ARCHS: dict[str, Callable[[dict], nn.Module]] = {
    "vit": lambda config: ViT(ViTConfig(**config)),
    "small": lambda config: SmallCNN(**config),
    "wrn50_2": lambda config: WideResNet50(**config),
}
