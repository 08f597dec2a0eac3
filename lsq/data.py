"""Data sets and loaders: the embedded digits, CIFAR-10/100, and ImageNet.

Small data sets (digits, CIFAR) follow KellerJordan/airbench: the whole set lives on the
training device as one uint8 tensor (N, C, H, W) and `DeviceLoader` augments it with one gather
for every 16 batches (`GATHER_BATCHES`: random crop from a zero-padded copy, with the horizontal
flip folded into the column index), then converts each batch to float and normalizes it. No
per-image Python, no workers.

ImageNet is too large for that and uses torchvision's ImageFolder and DataLoader, wrapped so
that batches arrive on the device.

Every random draw of the data path (shuffle order, crop offsets, flips) comes from the
CPU `torch.Generator` the trainer passes in, drawn at the start of each epoch. So saving
`generator.get_state()` between epochs and restoring it resumes a run bit-identically on CPU.
(ImageNet with workers=0 is the exception: torchvision's transforms then draw from torch's
global RNG, which the trainer seeds.)
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import re
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import CIFAR_FOLDERS, ConfigError, TrialConfig, data_layout
from .files import atomic_write

# Per-channel pixel mean/std of the training sets (values in 0..1).
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CIFAR_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
CIFAR_CLASSES = {"cifar10": 10, "cifar100": 100}
IMAGE_EXTS = (".jpg", ".jpeg", ".png")
TEST_BATCH = 500  # evaluation batch size for the small sets (at least the training batch size)

_CACHE: dict[str, dict[str, torch.Tensor]] = {}  # processed digits, once per process


@dataclass
class Data:
    train: "DeviceLoader | DeviceDataLoader"  # (images, labels) on device; one pass = one epoch
    test: "DeviceLoader | DeviceDataLoader"  # same, unshuffled, no augmentation
    num_classes: int
    in_channels: int
    image_size: int
    train_size: int
    test_size: int


# ------------------------------------------------------------------------------ small-data path
class DeviceLoader:
    """Batches of a uint8 image tensor held on the device, augmented on the device.

    Yields (float32 normalized images (B, C, H, W), int64 labels (B,)), both on the device.
    pad > 0: random crop of the original size from a copy zero-padded by `pad` on each side.
    flip: random horizontal flip with p = 0.5.
    """

    GATHER_BATCHES = 16  # batches per gather (crop, flip and shuffle in one indexing op)

    def __init__(self, images, labels, mean, std, batch_size, generator=None, shuffle=False,
                 pad=0, flip=False, drop_last=False, channels_last=False):
        assert images.dtype == torch.uint8 and images.ndim == 4
        assert generator is not None or not (shuffle or pad or flip), "randomness needs a generator"
        device = images.device
        self.n, self.c, self.h, self.w = images.shape
        self.labels = labels.to(device=device, dtype=torch.int64)
        self.batch_size, self.generator = batch_size, generator
        self.shuffle, self.pad, self.flip, self.drop_last = shuffle, pad, flip, drop_last
        self.channels_last = channels_last
        # Keep only the padded copy; `images` is a view of its centre.
        self.padded = F.pad(images, (pad,) * 4) if pad else images
        # (x/255 - mean)/std  ==  x * scale + shift, per channel.
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.scale = 1.0 / (255.0 * self.std)
        self.shift = -self.mean / self.std
        # Row/column offsets inside a crop window, and all channels, for the gather.
        self.rows = torch.arange(self.h, device=device)
        self.cols = torch.arange(self.w, device=device)
        self.chans = torch.arange(self.c, device=device).view(1, -1, 1, 1)

    @property
    def images(self) -> torch.Tensor:
        p = self.pad
        return self.padded[:, :, p:p + self.h, p:p + self.w] if p else self.padded

    def __len__(self) -> int:
        if self.drop_last:
            return self.n // self.batch_size
        return math.ceil(self.n / self.batch_size)

    def __iter__(self):
        g, n, b, p = self.generator, self.n, self.batch_size, self.pad
        # Draw the whole epoch's randomness now (CPU generator), then move it over in one copy.
        # The generator's state after the epoch then does not depend on how far we iterate.
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        dy = dx = flip = torch.zeros(n, dtype=torch.int64)
        if p:
            dy, dx = torch.randint(0, 2 * p + 1, (2, n), generator=g)
        if self.flip:
            flip = torch.randint(0, 2, (n,), generator=g)
        plan = torch.stack([order, dy, dx, flip], 1).to(self.padded.device)
        # One gather per GATHER_BATCHES batches, so that most batches are a slice and its
        # normalization: on a GPU each launch costs host time, and a compiled step is short
        # enough for a gather per batch to show (5.8 % of a compiled W4A4 epoch on an H200).
        count = len(self) * b if self.drop_last else n  # images this epoch
        per_gather = self.GATHER_BATCHES * b
        for lo in range(0, count, per_gather):
            hi = min(lo + per_gather, count)
            x, y = self._gather(plan[lo:hi], lo, hi)
            for k in range(0, hi - lo, b):
                yield self.normalize(x[k:k + b]), y[k:k + b]

    def _gather(self, plan, lo: int, hi: int):
        """uint8 images and labels lo..hi of the epoch, as `plan` (image, dy, dx, flip) says."""
        i, y0, x0, f = plan.unbind(1)
        if self.pad or self.flip:
            # one gather does crop and flip: image i, all channels, rows y0 + r, and columns
            # x0 + c (or x0 + W-1-c where flipped)
            cols = torch.where(f.bool()[:, None], self.cols.flip(0), self.cols)
            x = self.padded[i.view(-1, 1, 1, 1), self.chans, (y0[:, None] + self.rows).view(-1, 1, self.h, 1),
                            (x0[:, None] + cols).view(-1, 1, 1, self.w)]
        else:
            x = self.padded[i] if self.shuffle else self.padded[lo:hi]  # in order: a view, no copy
        return x, self.labels[i] if self.shuffle else self.labels[lo:hi]

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> float32 (x/255 - mean)/std, in the requested memory format."""
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        x = x.to(torch.float32, memory_format=fmt)
        return torch.addcmul(self.shift, x, self.scale, out=x)  # one fused multiply-add, in place


def _small_data(train, test, mean, std, num_classes, cfg, device, generator, pad, flip, channels_last):
    """Data for a small set given CPU uint8 tensors train = (images, labels), test = (...)."""
    (xtr, ytr), (xte, yte) = train, test
    n, b = len(xtr), cfg.batch_size
    common = dict(mean=mean, std=std, generator=generator, channels_last=channels_last)
    train_loader = DeviceLoader(xtr.to(device), ytr.to(device), batch_size=b, shuffle=True,
                                pad=pad, flip=flip, drop_last=n >= b, **common)
    test_loader = DeviceLoader(xte.to(device), yte.to(device), batch_size=max(b, TEST_BATCH), **common)
    _, c, h, _ = xtr.shape
    return Data(train_loader, test_loader, num_classes, c, h, n, len(xte))


# ------------------------------------------------------------------------------------- digits
def digits_split():
    """Indices (train, test) into sklearn's load_digits(): stratified 80/20, fixed for every seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    y = load_digits().target
    return train_test_split(range(len(y)), test_size=0.2, stratify=y, random_state=0)


DIGITS_CACHE_VERSION = 1  # bump when _build_digits or digits_split changes what they produce


def _digits_cache_file() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "lsq", f"digits16_v{DIGITS_CACHE_VERSION}.pt")


def _build_digits() -> dict[str, torch.Tensor]:
    """The digits as 16x16 uint8 images (bilinear 2x upsampling of the 8x8 originals), split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] * (255.0 / 16.0)  # 0..16 -> 0..255
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    x = x.round().clamp(0, 255).to(torch.uint8)
    y = torch.tensor(d.target, dtype=torch.int64)
    tr, te = (torch.tensor(i) for i in digits_split())
    return {"x_train": x[tr], "y_train": y[tr], "x_test": x[te], "y_test": y[te]}


def _read_digits(path: str):
    """The cached digits, or None if the file is missing, unreadable or not what it should be."""
    try:
        d = torch.load(path, weights_only=True)
        ok = (isinstance(d, dict) and d["x_train"].shape == (1437, 1, 16, 16) and d["x_test"].shape == (360, 1, 16, 16)
              and d["x_train"].dtype == torch.uint8 and d["y_train"].shape == (1437,) and d["y_test"].shape == (360,))
        return d if ok else None
    except Exception:  # missing, truncated, another format: build it again
        return None


def _digits() -> dict[str, torch.Tensor]:
    """The processed digits: once per process, and from ~/.cache/lsq once per machine (importing
    scikit-learn to build them takes over a second in every new trial worker)."""
    if "digits" not in _CACHE:
        path = _digits_cache_file()
        d = _read_digits(path)
        if d is None:
            d = _build_digits()
            _save_atomic(d, path)  # best effort: a read-only home just builds them each time
        _CACHE["digits"] = d
    return _CACHE["digits"]


def _load_digits(cfg, device, generator, channels_last):
    d = _digits()
    x = d["x_train"].float() / 255  # normalize with the training set's own statistics
    mean, std = x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3))
    return _small_data((d["x_train"], d["y_train"]), (d["x_test"], d["y_test"]), mean, std, 10,
                       cfg, device, generator, pad=2, flip=False, channels_last=channels_last)


# -------------------------------------------------------------------------------------- CIFAR
# How the user sets key 'data_dir', for the messages below: the sweep's way (sweep.py --set);
# lsq.train and lsq.export, whose flag is --data_dir, pass theirs to load_data (via the Trainer).
DATA_DIR_FLAG = "--set data_dir"


def _missing(cfg, flag: str, what: str, looked: str, extra: str = "") -> ConfigError:
    return ConfigError(
        f"key 'data_dir' = {cfg.data_dir!r}: no {what} found: looked for {looked}{extra}; "
        f"unpack it there or pass {flag}=<folder>"
    )


def _check_dir(cfg, flag: str) -> str:
    root = os.path.abspath(os.path.expanduser(cfg.data_dir))
    if not os.path.isdir(root):
        raise ConfigError(
            f"key 'data_dir' = {cfg.data_dir!r}: no such folder ({root}); "
            f"pass {flag}=<folder holding {cfg.dataset}>"
        )
    return root


def _torchvision_cifar(name: str, root: str, download: bool):
    """(train, test) as CPU uint8 (N, 3, 32, 32) images and int64 labels, in torchvision's format."""
    import torchvision  # here, not at the top: a trial on digits or a cached set never pays its import

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    out = []
    for train in (True, False):
        ds = cls(root=root, train=train, download=download)
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
        out.append((x, torch.tensor(ds.targets, dtype=torch.int64)))
    return out


def _download(name: str, root: str):
    """One download attempt through torchvision (usually fails: no network). The trials of a
    sweep start together: an exclusive lock on data_dir/.lsq_download.lock lets one download
    while the others wait, then find the archive complete (torchvision checks its MD5) and only
    read it, instead of all writing the same 170 MB file at once."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock, one attempt each
        return _torchvision_cifar(name, root, download=True)
    with open(os.path.join(root, ".lsq_download.lock"), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError:  # a file system without locks (NFSv3 without its lock service): one attempt each
            pass
        return _torchvision_cifar(name, root, download=True)  # closing the file releases the lock


class BadImageError(ConfigError):
    """An image file that cannot be decoded. A DataLoader worker's error reaches the trainer as a
    new error of its class whose message is the worker's whole traceback: only ours, at its end, is kept."""

    def __init__(self, message: str):
        super().__init__(message.rpartition("BadImageError: ")[2].strip())


def _bad_image(path: str, e: Exception) -> BadImageError:
    why = re.sub(r"^\w+, \S+:\d+, ", "", str(e))  # (torchvision's errors start with its function, file and line)
    return BadImageError(f"ImageFolder image {path}: cannot be decoded ({why}); allowed: an image file that "
                         "decodes (replace or remove this one)")


def _classes(folder: str) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _decode_folder(folder: str, classes: list[str]):
    """Decode an ImageFolder split: uint8 (N, 3, H, W) images and int64 labels, in sorted order."""
    from torchvision.io import ImageReadMode, decode_image

    images, labels = [], []
    with warnings.catch_warnings():  # torchvision 0.29 points to TorchCodec on every call
        warnings.simplefilter("ignore", DeprecationWarning)
        for label, name in enumerate(classes):
            sub = os.path.join(folder, name)
            for f in sorted(os.listdir(sub)):
                if f.lower().endswith(IMAGE_EXTS):
                    path = os.path.join(sub, f)
                    try:
                        with open(path, "rb") as fh:
                            raw = bytearray(fh.read())
                        if not raw:  # (torch.frombuffer's own message would be about buffer lengths)
                            raise ValueError("an empty file")
                        images.append(decode_image(torch.frombuffer(raw, dtype=torch.uint8), mode=ImageReadMode.RGB))
                    except (OSError, ValueError, RuntimeError) as e:  # (decode_image: RuntimeError)
                        raise _bad_image(path, e) from None
                    labels.append(label)
    if not images:
        raise ConfigError(f"ImageFolder {folder}: no {'/'.join(IMAGE_EXTS)} images in its class folders")
    shapes = {tuple(x.shape) for x in images}
    if len(shapes) > 1:
        raise ConfigError(f"ImageFolder {folder}: images differ in size ({sorted(shapes)[:3]}...); expected all 32x32")
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


def _cache_file(root: str, split: str) -> str:
    """data_dir/.lsq_cache_<split>.pt if data_dir is writable, else under ~/.cache/lsq."""
    if os.access(root, os.W_OK):
        return os.path.join(root, f".lsq_cache_{split}.pt")
    key = hashlib.sha1(root.encode()).hexdigest()[:16]
    return os.path.join(os.path.expanduser("~"), ".cache", "lsq", key, f".lsq_cache_{split}.pt")


def _folder_split(root: str, split: str, classes: list[str]):
    """An ImageFolder split decoded once, then read back from a uint8 tensor cache file."""
    folder, cache = os.path.join(root, split), _cache_file(root, split)
    # The cache is fresh if newer than the split folder and every class folder (adding or
    # removing an image touches its class folder).
    newest = max(os.path.getmtime(p) for p in [folder] + [os.path.join(folder, c) for c in classes])
    if os.path.isfile(cache) and os.path.getmtime(cache) > newest:
        try:
            d = torch.load(cache, weights_only=True)
            if d["classes"] == classes:
                return d["images"], d["labels"]
        except Exception:
            pass  # unreadable cache: decode again and overwrite it
    images, labels = _decode_folder(folder, classes)
    _save_atomic({"images": images, "labels": labels, "classes": classes}, cache)
    return images, labels


def _save_atomic(obj, path: str) -> None:
    """Best effort: torch.save `obj` to `path` whole (files.atomic_write), so a concurrent
    reader (another trial) sees the old file or the whole new one."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    with contextlib.suppress(OSError):
        atomic_write(path, buf.getbuffer())  # (no second copy of the bytes)


def _load_cifar(cfg, device, generator, channels_last, flag):
    name, root = cfg.dataset, _check_dir(cfg, flag)
    want, human = CIFAR_CLASSES[name], CIFAR_NAMES[name]
    tv_folder = os.path.join(root, CIFAR_FOLDERS[name])
    train_dir, test_dir = os.path.join(root, "train"), os.path.join(root, "test")
    layout = data_layout(name, root)
    if layout == "torchvision":  # 1. torchvision's own format
        try:
            train, test = _torchvision_cifar(name, root, download=False)
        except Exception as e:
            raise ConfigError(f"key 'data_dir' = {cfg.data_dir!r}: {tv_folder} is not a readable "
                              f"{human} in torchvision's format: {e}") from None
    elif layout == "imagefolder":  # 2. an ImageFolder tree
        classes = _classes(train_dir)
        if len(classes) != want or _classes(test_dir) != classes:
            raise ConfigError(
                f"key 'data_dir' = {cfg.data_dir!r}: ImageFolder {train_dir} has {len(classes)} class "
                f"folders (test: {len(_classes(test_dir))}); {human} needs the same {want} in train/ and test/"
            )
        train, test = (_folder_split(root, s, classes) for s in ("train", "test"))
    else:  # 3. one download attempt
        try:
            train, test = _download(name, root)
        except Exception as e:
            looked = (f"{tv_folder} (torchvision format) and {train_dir}/<class>/*.jpg + "
                      f"{test_dir}/<class>/*.jpg (ImageFolder)")
            raise _missing(cfg, flag, human, looked, f"; download failed: {type(e).__name__}: {e}") from None
    x = train[0]
    if tuple(x.shape[1:]) != (3, 32, 32):
        raise ConfigError(f"key 'data_dir' = {cfg.data_dir!r}: {human} images must be 3x32x32, got {tuple(x.shape[1:])}")
    mean, std = CIFAR_STATS[name]
    return _small_data(train, test, mean, std, want, cfg, device, generator,
                       pad=4, flip=True, channels_last=channels_last)


# ----------------------------------------------------------------------------------- ImageNet
def _load_image(path: str):
    """torchvision's ImageFolder loader (PIL), read when a batch needs the image: a file that cannot
    be decoded is a BadImageError naming it, not PIL's traceback in the middle of an epoch."""
    from torchvision.datasets.folder import default_loader

    try:
        return default_loader(path)
    except (OSError, ValueError, SyntaxError) as e:  # PIL.UnidentifiedImageError, a truncated file, ...
        raise _bad_image(path, e) from None


class DeviceDataLoader:
    """A torch DataLoader whose batches arrive on the device, reseeded from the trainer's
    generator at the start of every epoch (shuffle order and the workers' seeds)."""

    def __init__(self, loader, device, generator=None, channels_last=False):
        self.loader, self.device, self.generator = loader, device, generator
        self.channels_last = channels_last

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        if self.generator is not None:  # the loader's sampler holds the same loader.generator
            self.loader.generator.manual_seed(int(torch.randint(2**62, (), generator=self.generator)))
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        for x, y in self.loader:
            yield (x.to(self.device, non_blocking=True, memory_format=fmt),
                   y.to(self.device, non_blocking=True))


def _load_imagenet(cfg, device, generator, channels_last, flag):
    root = _check_dir(cfg, flag)
    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
    if data_layout("imagenet", root) is None:
        raise _missing(cfg, flag, "ImageNet", f"{train_dir}/<class>/*.JPEG and {val_dir}/<class>/*.JPEG (ImageFolder; "
                       "val/ sorted into class folders)")
    import torchvision
    from torchvision import transforms as T

    normalize = T.Normalize(*IMAGENET_STATS)
    train_tf = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    val_tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), normalize])
    try:
        train = torchvision.datasets.ImageFolder(train_dir, transform=train_tf, loader=_load_image)
        val = torchvision.datasets.ImageFolder(val_dir, transform=val_tf, loader=_load_image)
    except (FileNotFoundError, RuntimeError) as e:  # e.g. a class folder without images
        raise ConfigError(f"key 'data_dir' = {cfg.data_dir!r}: not a usable ImageNet ImageFolder: {e}") from None
    if val.classes != train.classes:
        raise ConfigError(f"key 'data_dir' = {cfg.data_dir!r}: {val_dir} and {train_dir} hold different class folders")
    b = cfg.batch_size
    common = dict(num_workers=cfg.workers, pin_memory=torch.device(device).type == "cuda")
    # ImageNet evaluates at the training batch size: 500 float 224x224 images per batch, times
    # the workers' prefetch, would be several GB of shared memory.
    train_loader = torch.utils.data.DataLoader(train, batch_size=b, shuffle=True, drop_last=len(train) >= b,
                                               generator=torch.Generator(), **common)
    # Evaluation draws nothing from `generator`; its own fixed generator keeps torch's global RNG untouched.
    val_loader = torch.utils.data.DataLoader(val, batch_size=b, shuffle=False,
                                             generator=torch.Generator().manual_seed(0), **common)
    return Data(DeviceDataLoader(train_loader, device, generator, channels_last),
                DeviceDataLoader(val_loader, device, None, channels_last),
                len(train.classes), 3, 224, len(train), len(val))


# -------------------------------------------------------------------------------- entry point
def load_data(cfg: TrialConfig, device: torch.device, generator: torch.Generator,
              channels_last: bool = False, data_dir_flag: str = DATA_DIR_FLAG) -> Data:
    """The train and test loaders of cfg.dataset on `device`. All randomness from `generator`.
    `data_dir_flag`: how the command being run sets key 'data_dir', for the error messages."""
    device = torch.device(device)
    if cfg.dataset == "digits":
        return _load_digits(cfg, device, generator, channels_last)
    if cfg.dataset in CIFAR_STATS:
        return _load_cifar(cfg, device, generator, channels_last, data_dir_flag)
    if cfg.dataset == "imagenet":
        return _load_imagenet(cfg, device, generator, channels_last, data_dir_flag)
    raise ConfigError(f"key 'dataset' = {cfg.dataset!r}: unknown; allowed: digits, cifar10, cifar100, imagenet")
