"""Data sets and loaders: the embedded digits, CIFAR-10/100, and ImageNet.

Small sets follow KellerJordan/airbench: the whole set lives on the device as one uint8 tensor
and `DeviceLoader` augments it there (random crop of a zero-padded copy, horizontal flip), with
no per-image Python and no workers. ImageNet uses torchvision's ImageFolder and DataLoader.
Every random draw comes from the trainer's CPU generator, drawn at the start of each epoch, so
restoring its state between epochs resumes a run bit-identically on the CPU.
"""

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
from torch.utils.data import DataLoader

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
# How the user sets key 'data_dir' in the messages: the sweep's way; lsq.train and lsq.export pass theirs.
DATA_DIR_FLAG = "--set data_dir"

_CACHE: dict[str, dict[str, torch.Tensor]] = {}  # processed digits, once per process


@dataclass
class Data:
    train: "DeviceLoader | DeviceDataLoader"  # (images, labels) on the device; one pass = one epoch
    test: "DeviceLoader | DeviceDataLoader"  # the same, unshuffled, not augmented
    num_classes: int
    in_channels: int
    image_size: int
    train_size: int
    test_size: int


@dataclass(eq=False)
class DeviceLoader:
    """Batches (float32 normalized images, int64 labels) of a uint8 (N, C, H, W) tensor on the device."""

    images: torch.Tensor
    labels: torch.Tensor
    mean: torch.Tensor  # per channel, of x/255
    std: torch.Tensor
    batch_size: int
    generator: torch.Generator | None = None
    shuffle: bool = False
    pad: int = 0  # > 0: a random crop of the original size from a copy zero-padded by `pad`
    flip: bool = False  # a random horizontal flip with p = 0.5
    drop_last: bool = False
    channels_last: bool = False

    GATHER_BATCHES = 16  # batches per gather (crop, flip and shuffle in one indexing op)

    def __post_init__(self):
        device, p = self.images.device, self.pad
        self.n, self.c, self.h, self.w = self.images.shape
        self.labels = self.labels.to(device=device, dtype=torch.int64)
        self.padded = F.pad(self.images, (p,) * 4) if p else self.images
        self.images = self.padded[:, :, p : p + self.h, p : p + self.w]  # a view: one copy is kept
        self.mean = torch.as_tensor(self.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.as_tensor(self.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.scale, self.shift = 1.0 / (255.0 * self.std), -self.mean / self.std  # (x/255 - mean)/std
        self.rows, self.cols = torch.arange(self.h, device=device), torch.arange(self.w, device=device)
        self.chans = torch.arange(self.c, device=device).view(1, -1, 1, 1)
        self.fmt = torch.channels_last if self.channels_last else torch.contiguous_format

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else math.ceil(self.n / self.batch_size)

    def __iter__(self):
        g, n, b, p = self.generator, self.n, self.batch_size, self.pad
        # The whole epoch's draws now: the generator's state after it does not depend on how far
        # the epoch is iterated.
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        dy = dx = flip = torch.zeros(n, dtype=torch.int64)
        if p:
            dy, dx = torch.randint(0, 2 * p + 1, (2, n), generator=g)
        if self.flip:
            flip = torch.randint(0, 2, (n,), generator=g)
        plan = torch.stack([order, dy, dx, flip], 1).to(self.padded.device)
        # One gather per GATHER_BATCHES batches, and a slice per batch: on a GPU each launch costs
        # host time, which a compiled step is short enough to show.
        count = len(self) * b if self.drop_last else n  # images this epoch
        for lo in range(0, count, self.GATHER_BATCHES * b):
            hi = min(lo + self.GATHER_BATCHES * b, count)
            x, y = self._gather(plan[lo:hi], lo, hi)
            for k in range(0, hi - lo, b):
                yield self.normalize(x[k : k + b]), y[k : k + b]

    def _gather(self, plan, lo: int, hi: int):
        """uint8 images and labels lo..hi of the epoch, as `plan` (image, dy, dx, flip) says."""
        i, y0, x0, f = plan.unbind(1)
        if not (self.pad or self.flip):
            i = i if self.shuffle else slice(lo, hi)  # in order: a view, no copy
            return self.padded[i], self.labels[i]
        # image i, all channels, rows y0 + r, columns x0 + c (x0 + W-1-c where flipped)
        cols = torch.where(f.bool()[:, None], self.cols.flip(0), self.cols)
        cols = (x0[:, None] + cols).view(-1, 1, 1, self.w)
        rows = (y0[:, None] + self.rows).view(-1, 1, self.h, 1)
        return self.padded[i.view(-1, 1, 1, 1), self.chans, rows, cols], self.labels[i]

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> float32 (x/255 - mean)/std, in the requested memory format."""
        x = x.to(torch.float32, memory_format=self.fmt)
        return torch.addcmul(self.shift, x, self.scale, out=x)  # one fused multiply-add, in place


def _small_data(train, test, mean, std, num_classes, cfg, device, generator, channels_last, **augment):
    """Data for a small set from CPU uint8 tensors train = (images, labels), test = (...)."""
    (xtr, ytr), (xte, yte), b = train, test, cfg.batch_size
    common = dict(mean=mean, std=std, generator=generator, channels_last=channels_last)
    test_loader = DeviceLoader(xte.to(device), yte.to(device), batch_size=max(b, TEST_BATCH), **common)
    common.update(shuffle=True, drop_last=len(xtr) >= b, **augment)
    train_loader = DeviceLoader(xtr.to(device), ytr.to(device), batch_size=b, **common)
    return Data(train_loader, test_loader, num_classes, xtr.shape[1], xtr.shape[2], len(xtr), len(xte))


def digits_split():
    """Indices (train, test) into sklearn's load_digits(): stratified 80/20, fixed for every seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    y = load_digits().target
    return train_test_split(range(len(y)), test_size=0.2, stratify=y, random_state=0)


DIGITS_CACHE_VERSION = 1  # bump when _build_digits or digits_split changes what they produce
DIGITS_KEYS = {"x_train", "y_train", "x_test", "y_test"}


def _digits_cache_file() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "lsq", f"digits16_v{DIGITS_CACHE_VERSION}.pt")


def _build_digits() -> dict[str, torch.Tensor]:
    """The digits as 16x16 uint8 images (bilinear 2x upsampling of the 8x8 originals), split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] * (255.0 / 16.0)  # 0..16 -> 0..255
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    x, y = x.round().clamp(0, 255).to(torch.uint8), torch.tensor(d.target, dtype=torch.int64)
    tr, te = (torch.tensor(i) for i in digits_split())
    return {"x_train": x[tr], "y_train": y[tr], "x_test": x[te], "y_test": y[te]}


def _digits() -> dict[str, torch.Tensor]:
    """The processed digits: built once per machine (importing scikit-learn costs a new trial
    worker over a second), then read from ~/.cache/lsq."""
    if "digits" not in _CACHE:
        path, d = _digits_cache_file(), None
        with contextlib.suppress(Exception):  # missing, truncated, another format: build them again
            d = torch.load(path, weights_only=True)
        if not (isinstance(d, dict) and set(d) == DIGITS_KEYS):
            d = _build_digits()
            _save_atomic(d, path)
        _CACHE["digits"] = d
    return _CACHE["digits"]


def _load_digits(cfg, device, generator, channels_last):
    d = _digits()
    x = d["x_train"].float() / 255  # normalized with the training set's own statistics
    mean, std = x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3))
    train, test = (d["x_train"], d["y_train"]), (d["x_test"], d["y_test"])
    return _small_data(train, test, mean, std, 10, cfg, device, generator, channels_last, pad=2)


def _missing(cfg, flag: str, what: str, looked: str, extra: str = "") -> ConfigError:
    return ConfigError(
        f"key 'data_dir' = {cfg.data_dir!r}: no {what} found: looked for {looked}{extra}; "
        f"unpack it there or pass {flag}=<folder>"
    )


def _check_dir(cfg, flag: str) -> str:
    root = os.path.abspath(os.path.expanduser(cfg.data_dir))
    if not os.path.isdir(root):
        why = f"no such folder ({root}); pass {flag}=<folder holding {cfg.dataset}>"
        raise ConfigError(f"key 'data_dir' = {cfg.data_dir!r}: {why}")
    return root


def _torchvision_cifar(name: str, root: str, download: bool):
    """(train, test) as CPU uint8 (N, 3, 32, 32) images and int64 labels, in torchvision's format."""
    import torchvision  # here: a trial on digits or a cached set never pays its import

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    sets = [cls(root=root, train=train, download=download) for train in (True, False)]
    return [
        (torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(s.targets)) for s in sets
    ]


def _download(name: str, root: str):
    """One download attempt through torchvision. A sweep's trials start together: a lock on
    data_dir/.lsq_download.lock lets one download while the others wait, then find the archive
    complete (torchvision checks its MD5) instead of all writing the same file at once."""
    import fcntl

    with open(os.path.join(root, ".lsq_download.lock"), "a") as lock:
        with contextlib.suppress(OSError):  # a file system without locks: each trial tries alone
            fcntl.flock(lock, fcntl.LOCK_EX)
        return _torchvision_cifar(name, root, download=True)  # closing the file releases the lock


class BadImageError(ConfigError):
    """An image file that cannot be decoded. From a DataLoader worker it arrives with the worker's
    traceback in its message: only ours, at its end, is kept."""

    def __init__(self, message: str):
        super().__init__(message.rpartition("BadImageError: ")[2].strip())


def _bad_image(path: str, e: Exception) -> BadImageError:
    why = re.sub(r"^\w+, \S+:\d+, ", "", str(e))  # (torchvision's errors start with function, file, line)
    return BadImageError(
        f"ImageFolder image {path}: cannot be decoded ({why}); allowed: an image file that decodes "
        "(replace or remove this one)"
    )


def _classes(folder: str) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _decode_folder(folder: str, classes: list[str]):
    """Decode an ImageFolder split: uint8 (N, 3, H, W) images and int64 labels, in sorted order."""
    from torchvision.io import ImageReadMode, decode_image

    images, labels = [], []
    with warnings.catch_warnings(action="ignore", category=DeprecationWarning):  # (torchvision: TorchCodec)
        for label, name in enumerate(classes):
            for f in sorted(os.listdir(os.path.join(folder, name))):
                path = os.path.join(folder, name, f)
                if not f.lower().endswith(IMAGE_EXTS):
                    continue
                try:
                    with open(path, "rb") as fh:
                        raw = bytearray(fh.read())
                    if not raw:  # (torch.frombuffer's own message would be about buffer lengths)
                        raise ValueError("an empty file")
                    images.append(
                        decode_image(torch.frombuffer(raw, dtype=torch.uint8), mode=ImageReadMode.RGB)
                    )
                except (OSError, ValueError, RuntimeError) as e:
                    raise _bad_image(path, e) from None
                labels.append(label)
    if not images:
        raise ConfigError(f"ImageFolder {folder}: no {'/'.join(IMAGE_EXTS)} images in its class folders")
    shapes = sorted({tuple(x.shape) for x in images})
    if len(shapes) > 1:
        raise ConfigError(
            f"ImageFolder {folder}: images differ in size ({shapes[:3]}...); expected all 32x32"
        )
    return torch.stack(images), torch.tensor(labels)


def _folder_split(root: str, split: str, classes: list[str]):
    """An ImageFolder split decoded once, then read back from a uint8 tensor cache file: in
    data_dir if it is writable, else under ~/.cache/lsq."""
    folder, name = os.path.join(root, split), f".lsq_cache_{split}.pt"
    home = os.path.join(
        os.path.expanduser("~"), ".cache", "lsq", hashlib.sha1(root.encode()).hexdigest()[:16]
    )
    cache = os.path.join(root if os.access(root, os.W_OK) else home, name)
    # fresh if newer than the split and its class folders (adding or removing an image touches one)
    newest = max(os.path.getmtime(p) for p in [folder] + [os.path.join(folder, c) for c in classes])
    if os.path.isfile(cache) and os.path.getmtime(cache) > newest:
        with contextlib.suppress(Exception):  # unreadable: decode again and overwrite it
            d = torch.load(cache, weights_only=True)
            if d["classes"] == classes:
                return d["images"], d["labels"]
    images, labels = _decode_folder(folder, classes)
    _save_atomic({"images": images, "labels": labels, "classes": classes}, cache)
    return images, labels


def _save_atomic(obj, path: str) -> None:
    """Best effort (a read-only home just builds it each time): torch.save `obj` to `path` whole,
    so that a concurrent reader (another trial) sees the old file or the whole new one."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    with contextlib.suppress(OSError):
        atomic_write(path, buf.getbuffer())


def _load_cifar(cfg, device, generator, channels_last, flag):
    name, root = cfg.dataset, _check_dir(cfg, flag)
    want, human = CIFAR_CLASSES[name], CIFAR_NAMES[name]
    tv_folder, train_dir, test_dir = (os.path.join(root, d) for d in (CIFAR_FOLDERS[name], "train", "test"))
    layout, where = data_layout(name, root), f"key 'data_dir' = {cfg.data_dir!r}"
    if layout == "torchvision":
        try:
            train, test = _torchvision_cifar(name, root, download=False)
        except Exception as e:  # noqa: BLE001 (whatever torchvision raises for a damaged copy)
            raise ConfigError(
                f"{where}: {tv_folder} is not a readable {human} in torchvision's format: {e}"
            ) from None
    elif layout == "imagefolder":
        classes = _classes(train_dir)
        if len(classes) != want or _classes(test_dir) != classes:
            raise ConfigError(
                f"{where}: ImageFolder {train_dir} has {len(classes)} class folders (test: "
                f"{len(_classes(test_dir))}); {human} needs the same {want} in train/ and test/"
            )
        train, test = (_folder_split(root, s, classes) for s in ("train", "test"))
    else:  # one download attempt (usually fails: no network)
        try:
            train, test = _download(name, root)
        except Exception as e:  # noqa: BLE001 (no network, a proxy, a full disk: all one message)
            looked = f"{tv_folder} (torchvision format) and {train_dir}/<class>/*.jpg + {test_dir}/<class>/*.jpg (ImageFolder)"
            raise _missing(cfg, flag, human, looked, f"; download failed: {type(e).__name__}: {e}") from None
    if tuple(train[0].shape[1:]) != (3, 32, 32):
        raise ConfigError(f"{where}: {human} images must be 3x32x32, got {tuple(train[0].shape[1:])}")
    mean, std = CIFAR_STATS[name]
    return _small_data(train, test, mean, std, want, cfg, device, generator, channels_last, pad=4, flip=True)


def _load_image(path: str):
    """torchvision's ImageFolder loader (PIL), with an image that cannot be decoded a BadImageError
    naming it rather than PIL's traceback in the middle of an epoch."""
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
        self.fmt = torch.channels_last if channels_last else torch.contiguous_format

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        if self.generator is not None:  # the loader's sampler holds the same loader.generator
            self.loader.generator.manual_seed(int(torch.randint(2**62, (), generator=self.generator)))
        to = dict(device=self.device, non_blocking=True)
        for x, y in self.loader:
            yield x.to(memory_format=self.fmt, **to), y.to(**to)


def _load_imagenet(cfg, device, generator, channels_last, flag):
    root = _check_dir(cfg, flag)
    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
    where = f"key 'data_dir' = {cfg.data_dir!r}"
    if data_layout("imagenet", root) is None:
        looked = f"{train_dir}/<class>/*.JPEG and {val_dir}/<class>/*.JPEG (ImageFolder; val/ sorted into class folders)"
        raise _missing(cfg, flag, "ImageNet", looked)
    import torchvision
    from torchvision import transforms as T

    normalize = T.Normalize(*IMAGENET_STATS)
    train_tf = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    val_tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), normalize])
    try:
        train = torchvision.datasets.ImageFolder(train_dir, transform=train_tf, loader=_load_image)
        val = torchvision.datasets.ImageFolder(val_dir, transform=val_tf, loader=_load_image)
    except (FileNotFoundError, RuntimeError) as e:  # e.g. a class folder without images
        raise ConfigError(f"{where}: not a usable ImageNet ImageFolder: {e}") from None
    if val.classes != train.classes:
        raise ConfigError(f"{where}: {val_dir} and {train_dir} hold different class folders")
    b, common = cfg.batch_size, dict(num_workers=cfg.workers, pin_memory=torch.device(device).type == "cuda")
    # Evaluation at the training batch size: TEST_BATCH float 224x224 images per batch, times the
    # workers' prefetch, would be GBs of shared memory. Its own fixed generator: no draw from ours.
    train_dl = DataLoader(
        train, b, shuffle=True, drop_last=len(train) >= b, generator=torch.Generator(), **common
    )
    val_dl = DataLoader(val, b, generator=torch.Generator().manual_seed(0), **common)
    train_dl = DeviceDataLoader(train_dl, device, generator, channels_last)
    val_dl = DeviceDataLoader(val_dl, device, None, channels_last)
    return Data(train_dl, val_dl, len(train.classes), 3, 224, len(train), len(val))


def load_data(cfg: TrialConfig, device, generator, channels_last=False, data_dir_flag=DATA_DIR_FLAG) -> Data:
    """The train and test loaders of cfg.dataset on `device`, all randomness from `generator`.
    `data_dir_flag`: how the command being run sets key 'data_dir', for the error messages."""
    device = torch.device(device)
    if cfg.dataset == "digits":
        return _load_digits(cfg, device, generator, channels_last)
    if cfg.dataset in CIFAR_STATS:
        return _load_cifar(cfg, device, generator, channels_last, data_dir_flag)
    return _load_imagenet(cfg, device, generator, channels_last, data_dir_flag)  # (config allows no other)
