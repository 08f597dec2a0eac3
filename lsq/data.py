"""Data sets and loaders. Small sets follow KellerJordan/airbench: one uint8 tensor on the device,
augmented there by `DeviceLoader`; ImageNet uses torchvision's ImageFolder and DataLoader. Every random
draw comes from the trainer's CPU generator, so restoring its state resumes a run bit-identically."""

import contextlib
import fcntl
import functools
import math
import os
import re
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .config import CIFAR_FOLDERS, ConfigError, TrialConfig, data_layout

# Per-channel pixel mean/std of the training sets (values in 0..1).
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
CIFAR_CLASSES = {"cifar10": 10, "cifar100": 100}
IMAGE_EXTS = (".jpg", ".jpeg", ".png")
TEST_BATCH = 500  # evaluation batch size for the small sets (at least the training batch size)
# How the user sets key 'data_dir' in the messages: the sweep's way; lsq.train and lsq.export pass theirs.
DATA_DIR_FLAG = "--set data_dir"


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

    GATHER_BATCHES = 16  # batches per gather: each launch costs host time, which a compiled step shows

    def __post_init__(self):
        device, p = self.images.device, self.pad
        self.n, self.c, self.h, self.w = self.images.shape
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
        # The epoch's draws all up front: the generator's next state is the same however far it is iterated.
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        still = torch.zeros(2, n, dtype=torch.int64)  # no shift, no flip
        dy, dx = torch.randint(0, 2 * p + 1, (2, n), generator=g) if p else still
        flip = torch.randint(0, 2, (n,), generator=g) if self.flip else still[0]
        count = len(self) * b if self.drop_last else n  # images this epoch
        plan = torch.stack([order, dy, dx, flip], 1)[:count].to(self.padded.device)
        for chunk in plan.split(self.GATHER_BATCHES * b):
            x, y = self.gather(*chunk.unbind(1))
            for xb, yb in zip(x.split(b), y.split(b)):
                yield self.normalize(xb), yb

    def gather(self, i, y0, x0, f):
        """uint8 images i and labels: rows y0 + r, columns x0 + c (x0 + W-1-c where f) of the padded copy."""
        if not (self.pad or self.flip):
            return self.padded[i], self.labels[i]
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


@functools.cache
def digits():
    """sklearn's digits: (train, test) as 16x16 uint8 images (bilinear 2x upsampling of the 8x8
    originals) and int64 labels, split stratified 80/20 the same way for every seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] * (255.0 / 16.0)  # 0..16 -> 0..255
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False).round().to(torch.uint8)
    y = torch.tensor(d.target, dtype=torch.int64)
    tr, te = train_test_split(range(len(y)), test_size=0.2, stratify=d.target, random_state=0)
    return (x[tr], y[tr]), (x[te], y[te])


def _missing(cfg, flag: str, what: str, looked: str, extra: str = "") -> ConfigError:
    return ConfigError(
        f"key 'data_dir' = {cfg.data_dir!r}: no {what} found: looked for {looked}{extra}; "
        f"unpack it there or pass {flag}=<folder>"
    )


def _torchvision_cifar(name: str, root: str, download: bool):
    """(train, test) as CPU uint8 (N, 3, 32, 32) images and int64 labels, in torchvision's format."""
    import torchvision  # here: a trial on digits never pays its import

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    sets = [cls(root=root, train=train, download=download) for train in (True, False)]
    return [(torch.from_numpy(s.data).movedim(3, 1).contiguous(), torch.tensor(s.targets)) for s in sets]


def _download(name: str, root: str):
    """One download attempt, under a lock: of the trials that start together, one downloads, the rest wait."""
    with open(os.path.join(root, ".lsq_download.lock"), "a") as lock:
        with contextlib.suppress(OSError):  # a file system without locks: each trial tries alone
            fcntl.flock(lock, fcntl.LOCK_EX)
        return _torchvision_cifar(name, root, download=True)  # closing the file releases the lock


class BadImageError(ConfigError):
    """An undecodable image. From a DataLoader worker, the message ends with ours: only that is kept."""

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
            d = os.path.join(folder, name)
            for path in sorted(os.path.join(d, f) for f in os.listdir(d) if f.lower().endswith(IMAGE_EXTS)):
                try:
                    if not os.path.getsize(path):  # (torchvision's own message names its read_file)
                        raise ValueError("an empty file")
                    image = decode_image(path, mode=ImageReadMode.RGB)
                except (OSError, ValueError, RuntimeError) as e:
                    raise _bad_image(path, e) from None
                if image.shape != (3, 32, 32):
                    raise ConfigError(f"ImageFolder image {path}: {tuple(image.shape)}; allowed: 3x32x32")
                images.append(image)
                labels.append(label)
    if not images:
        raise ConfigError(f"ImageFolder {folder}: no {'/'.join(IMAGE_EXTS)} images in its class folders")
    return torch.stack(images), torch.tensor(labels)


def _load_cifar(cfg, root, device, generator, channels_last, flag):
    name = cfg.dataset
    want, human = CIFAR_CLASSES[name], f"CIFAR-{name[5:]}"
    tv_folder, train_dir, test_dir = (os.path.join(root, d) for d in (CIFAR_FOLDERS[name], "train", "test"))
    layout, where = data_layout(name, root), f"key 'data_dir' = {cfg.data_dir!r}"
    if layout == "torchvision":
        try:
            train, test = _torchvision_cifar(name, root, download=False)
        except Exception as e:  # noqa: BLE001 (whatever torchvision raises for a damaged copy)
            why = f"{tv_folder} is not a readable {human} in torchvision's format: {e}"
            raise ConfigError(f"{where}: {why}") from None
    elif layout == "imagefolder":
        classes = _classes(train_dir)
        if len(classes) != want or _classes(test_dir) != classes:
            raise ConfigError(
                f"{where}: ImageFolder {train_dir} has {len(classes)} class folders (test: "
                f"{len(_classes(test_dir))}); {human} needs the same {want} in train/ and test/"
            )
        train, test = _decode_folder(train_dir, classes), _decode_folder(test_dir, classes)
    else:  # one download attempt (usually fails: no network)
        try:
            train, test = _download(name, root)
        except Exception as e:  # noqa: BLE001 (no network, a proxy, a full disk: all one message)
            looked = f"{tv_folder} (torchvision format) and {train_dir}/<class>/*.jpg + {test_dir}/<class>/*.jpg (ImageFolder)"
            raise _missing(cfg, flag, human, looked, f"; download failed: {type(e).__name__}: {e}") from None
    mean, std = CIFAR_STATS[name]
    return _small_data(train, test, mean, std, want, cfg, device, generator, channels_last, pad=4, flip=True)


def _load_image(path: str):
    """torchvision's ImageFolder loader (PIL); an image it cannot decode is a BadImageError naming it."""
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


def _load_imagenet(cfg, root, device, generator, channels_last, flag):
    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
    where = f"key 'data_dir' = {cfg.data_dir!r}"
    if data_layout("imagenet", root) is None:
        looked = f"{train_dir}/<class>/*.JPEG and {val_dir}/<class>/*.JPEG (ImageFolder; val/ sorted into class folders)"
        raise _missing(cfg, flag, "ImageNet", looked)
    import torchvision
    from torchvision import transforms as T

    normalize = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # ImageNet's mean and std
    train_tf = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    val_tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), normalize])
    try:
        train = torchvision.datasets.ImageFolder(train_dir, transform=train_tf, loader=_load_image)
        val = torchvision.datasets.ImageFolder(val_dir, transform=val_tf, loader=_load_image)
    except (FileNotFoundError, RuntimeError) as e:  # e.g. a class folder without images
        raise ConfigError(f"{where}: not a usable ImageNet ImageFolder: {e}") from None
    if val.classes != train.classes:
        raise ConfigError(f"{where}: {val_dir} and {train_dir} hold different class folders")
    b, pin = cfg.batch_size, device.type == "cuda"
    loader = functools.partial(DataLoader, batch_size=b, num_workers=cfg.workers, pin_memory=pin)
    # Evaluation at the training batch size (TEST_BATCH 224x224 images times the workers' prefetch
    # would be GBs of shared memory), with its own fixed generator: no draw from ours.
    train_dl = loader(train, shuffle=True, drop_last=len(train) >= b, generator=torch.Generator())
    val_dl = loader(val, generator=torch.Generator().manual_seed(0))
    train_dl = DeviceDataLoader(train_dl, device, generator, channels_last)
    val_dl = DeviceDataLoader(val_dl, device, None, channels_last)
    return Data(train_dl, val_dl, len(train.classes), 3, 224, len(train), len(val))


def load_data(cfg: TrialConfig, device, generator, channels_last=False, data_dir_flag=DATA_DIR_FLAG) -> Data:
    """The train and test loaders of cfg.dataset on `device`, all randomness from `generator`.
    `data_dir_flag`: how the command being run sets key 'data_dir', for the error messages."""
    device = torch.device(device)
    if cfg.dataset == "digits":
        train, test = digits()
        x = train[0].float() / 255  # normalized with the training set's own statistics
        mean, std = x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3))
        return _small_data(train, test, mean, std, 10, cfg, device, generator, channels_last, pad=2)
    root = os.path.abspath(os.path.expanduser(cfg.data_dir))
    if not os.path.isdir(root):
        why = f"no such folder ({root}); pass {data_dir_flag}=<folder holding {cfg.dataset}>"
        raise ConfigError(f"key 'data_dir' = {cfg.data_dir!r}: {why}")
    load = _load_cifar if cfg.dataset in CIFAR_STATS else _load_imagenet  # (config allows no other)
    return load(cfg, root, device, generator, channels_last, data_dir_flag)
