"""lsq/data.py: the digits split, on-device augmentation, CIFAR ImageFolder, ImageNet.

Expected values are recomputed independently here (sklearn's split, plain slicing for crops,
the published CIFAR statistics) rather than read back from the loader.
"""

import os
import re
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torchvision.io import encode_jpeg, encode_png

from lsq import data as D
from lsq.config import ConfigError, TrialConfig

CPU = torch.device("cpu")
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def cfg(**kw):
    return TrialConfig.from_dict(kw)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def epoch(loader):
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def to_uint8(x, mean, std):
    """Undo (x/255 - mean)/std with the given per-channel statistics."""
    mean, std = (torch.as_tensor(v, dtype=torch.float64).view(1, -1, 1, 1) for v in (mean, std))
    u = (x.double() * std + mean) * 255
    assert (u - u.round()).abs().max() < 1e-3  # really was an integer image
    return u.round().to(torch.uint8)


def windows(images, pad, flip):
    """(N, K, C, H, W): every crop of each image zero-padded by `pad`, and their mirrors if flip."""
    _, _, h, w = images.shape
    p = F.pad(images, (pad,) * 4)
    out = [p[:, :, y : y + h, x : x + w] for y in range(2 * pad + 1) for x in range(2 * pad + 1)]
    if flip:
        out += [o.flip(3) for o in out]
    return torch.stack(out, 1)


def expected_digits():
    """The digits split and 16x16 uint8 test images, computed here from sklearn."""
    d = load_digits()
    tr, te = train_test_split(np.arange(len(d.target)), test_size=0.2, stratify=d.target, random_state=0)
    x = torch.tensor(d.images[te], dtype=torch.float32)[:, None] * 255 / 16
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False).round().to(torch.uint8)
    return d, tr, te, x


# ------------------------------------------------------------------------------------- digits
def test_digits_shapes_split_and_test_set():
    d, tr, te, x_test = expected_digits()
    data = D.load_data(cfg(dataset="digits", batch_size=64), CPU, gen())
    assert (data.num_classes, data.in_channels, data.image_size) == (10, 1, 16)
    assert (data.train_size, data.test_size) == (1437, 360) == (len(tr), len(te))
    assert (len(data.train), len(data.test)) == (1437 // 64, 1)

    x, y = next(iter(data.train))
    assert x.shape == (64, 1, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.device == y.device == CPU

    # The split: sklearn's stratified split, the images of its train indices in their order.
    assert not set(tr) & set(te) and len(set(tr) | set(te)) == 1797
    train_u8 = torch.tensor(d.images[tr], dtype=torch.float32)[:, None] * 255 / 16
    train_u8 = F.interpolate(train_u8, size=(16, 16), mode="bilinear", align_corners=False).round()
    assert torch.equal(data.train.images, train_u8.to(torch.uint8))
    assert torch.equal(data.train.labels, torch.tensor(d.target[tr]))
    # Stratified: every class has ~20% of its images in the test set.
    per_class, in_test = np.bincount(d.target), np.bincount(d.target[te], minlength=10)
    assert np.all(np.abs(in_test - 0.2 * per_class) <= 1)

    # Test set: unshuffled, in split order, normalized with the *training* images' statistics.
    xt, yt = epoch(data.test)
    assert torch.equal(yt, torch.tensor(d.target[te]))
    m, s = (train_u8 / 255).mean().item(), (train_u8 / 255).std().item()
    torch.testing.assert_close(xt, (x_test.float() / 255 - m) / s, atol=1e-5, rtol=0)
    assert x_test.max() == 255 and x_test.min() == 0


def test_digits_same_split_for_every_seed():
    a = D.load_data(cfg(dataset="digits", seed=0), CPU, gen(0))
    b = D.load_data(cfg(dataset="digits", seed=7), CPU, gen(7))
    assert torch.equal(a.train.images, b.train.images)
    assert all(torch.equal(u, v) for u, v in zip(epoch(a.test), epoch(b.test)))


def test_digits_train_set_normalized():
    t = D.load_data(cfg(dataset="digits"), CPU, gen()).train
    plain = D.DeviceLoader(t.images, t.labels, t.mean, t.std, batch_size=t.n)  # no augmentation
    x, _ = epoch(plain)
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-3


def test_digits_epoch_covers_train_set():
    d, tr, _, _ = expected_digits()
    data = D.load_data(cfg(dataset="digits", batch_size=479), CPU, gen())  # 1437 = 3 * 479
    for _ in range(2):
        _, y = epoch(data.train)
        assert np.array_equal(np.bincount(y.numpy(), minlength=10), np.bincount(d.target[tr], minlength=10))


def test_digits_augmentation_is_a_shift_never_a_flip():
    t = D.load_data(cfg(dataset="digits", batch_size=64), CPU, gen(1)).train
    x, y = epoch(t)
    u = to_uint8(x, t.mean.flatten(), t.std.flatten())
    # Every (label, crop) that a 2-pixel shift of a training image can give, without flips.
    win = windows(t.images, 2, flip=False)
    allowed = {(int(lbl), w.numpy().tobytes()) for lbl, ws in zip(t.labels, win) for w in ws}
    assert all((int(lbl), img.numpy().tobytes()) in allowed for lbl, img in zip(y, u))
    # ...and the shifts are really applied: few crops are the centred original.
    centred = {img.numpy().tobytes() for img in t.images}
    assert sum(img.numpy().tobytes() in centred for img in u) < 0.2 * len(u)


# ------------------------------------------------------------------------ DeviceLoader itself
def test_crops_and_flips_are_exact_windows():
    n, pad = 40, 2
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=gen(5))
    mean, std = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
    loader = D.DeviceLoader(
        images, torch.arange(n), mean, std, batch_size=16, generator=gen(), shuffle=True, pad=pad, flip=True
    )
    x, y = epoch(loader)
    assert len(y) == n and sorted(y.tolist()) == list(range(n))  # drop_last off: all of them
    u = to_uint8(x, mean, std)
    win = windows(images, pad, flip=True)  # (N, 50, C, H, W); index k: offset k % 25, mirrored k >= 25
    hits = [(w == img).flatten(1).all(1).nonzero().flatten().tolist() for w, img in zip(win[y], u)]
    assert all(hits), "an augmented image is not a window of its own source image"
    kinds = [h[0] for h in hits]
    assert any(k >= 25 for k in kinds) and any(k < 25 for k in kinds)  # flipped and not
    assert len({k % 25 for k in kinds}) > 10  # many different offsets


def test_each_image_once_per_epoch_with_its_label():
    n = 200  # image i is constant i+1; a 2-pixel crop of an 8x8 image keeps its centre
    images = (torch.arange(n) + 1).to(torch.uint8).view(n, 1, 1, 1).expand(n, 1, 8, 8).contiguous()
    labels = torch.arange(n) % 7
    for drop_last, count in ((True, 192), (False, 200)):
        loader = D.DeviceLoader(
            images,
            labels,
            (0.0,),
            (1 / 255,),
            batch_size=64,
            generator=gen(),
            shuffle=True,
            pad=2,
            drop_last=drop_last,
        )
        assert len(loader) == (3 if drop_last else 4)
        orders = []
        for _ in range(2):
            x, y = epoch(loader)
            idx = x.round().long().amax(dim=(1, 2, 3)) - 1
            assert len(idx) == count and len(set(idx.tolist())) == count  # no image twice
            assert torch.equal(y, labels[idx])  # labels travel with their images
            orders.append(idx)
        assert not torch.equal(orders[0], orders[1])  # reshuffled every epoch


@pytest.mark.parametrize("shuffle,pad,flip", [(True, 2, True), (True, 0, False), (False, 0, False)])
def test_batches_do_not_depend_on_how_many_are_gathered_at_once(shuffle, pad, flip, monkeypatch):
    """The loader gathers GATHER_BATCHES batches at a time; one at a time, two (which splits the
    epoch unevenly) or all at once, every batch is the same, drop_last or not."""
    images = torch.randint(0, 256, (100, 3, 8, 8), dtype=torch.uint8, generator=gen(2))
    for drop_last in (False, True):
        batches = []
        for per_gather in (1, 2, 16):
            monkeypatch.setattr(D.DeviceLoader, "GATHER_BATCHES", per_gather)
            loader = D.DeviceLoader(
                images,
                torch.arange(100),
                (0.5,) * 3,
                (0.25,) * 3,
                batch_size=16,
                generator=gen(),
                shuffle=shuffle,
                pad=pad,
                flip=flip,
                drop_last=drop_last,
            )
            batches.append(list(loader))
        assert [len(y) for _, y in batches[0]] == [16] * 6 + ([] if drop_last else [4])
        for other in batches[1:]:
            assert len(other) == len(batches[0])
            assert all(
                torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(batches[0], other)
            )


def test_same_generator_state_same_batches():
    g = gen(3)
    data = D.load_data(cfg(dataset="digits", batch_size=100), CPU, g)
    state = g.get_state()
    e1, e2 = epoch(data.train), epoch(data.train)
    g.set_state(state)
    assert all(torch.equal(a, b) for a, b in zip(e1, epoch(data.train)))
    after_e1 = g.get_state()
    assert all(torch.equal(a, b) for a, b in zip(e2, epoch(data.train)))
    assert not torch.equal(e1[0], e2[0])  # a new epoch is a new shuffle and new crops
    # Resume: restoring the state saved between epochs replays the next epoch, even when
    # the previous epoch was cut short.
    g.set_state(state)
    next(iter(data.train))
    assert torch.equal(g.get_state(), after_e1)
    assert torch.equal(epoch(data.train)[0], e2[0])
    # Another seed, other batches; test batches never depend on the generator.
    other = D.load_data(cfg(dataset="digits", batch_size=100), CPU, gen(4))
    assert not torch.equal(epoch(other.train)[0], e1[0])
    assert torch.equal(epoch(other.test)[0], epoch(data.test)[0])


def test_partial_batch():
    big = D.load_data(cfg(dataset="digits", batch_size=2000), CPU, gen())
    assert len(big.train) == 1 and len(next(iter(big.train))[1]) == 1437  # batch > set: keep it
    assert all(len(y) == 64 for _, y in D.load_data(cfg(dataset="digits", batch_size=64), CPU, gen()).train)


# -------------------------------------------------------------------------------------- CIFAR
def write_tree(root, splits, classes, size=32, fmt="png"):
    """An ImageFolder tree of random images; returns {split: (uint8 images, labels)} in sorted order."""
    g, out = gen(9), {}
    for split, per_class in splits.items():
        xs, ys = [], []
        for label, name in enumerate(sorted(classes)):
            os.makedirs(root / split / name, exist_ok=True)
            for i in range(per_class):
                img = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g)
                raw = encode_png(img) if fmt == "png" else encode_jpeg(img)
                (root / split / name / f"{i:04d}.{fmt}").write_bytes(raw.numpy().tobytes())
                xs.append(img)
                ys.append(label)
        out[split] = (torch.stack(xs), torch.tensor(ys))
    return out


@pytest.fixture
def cifar_tree(tmp_path):
    classes = [f"class{c}" for c in (3, 1, 0, 2, 9, 4, 8, 5, 7, 6)]  # created out of order
    return tmp_path, write_tree(tmp_path, {"train": 3, "test": 2}, classes)


def test_cifar_image_folder(cifar_tree):
    root, written = cifar_tree
    data = D.load_data(cfg(dataset="cifar10", data_dir=str(root), batch_size=8), CPU, gen())
    assert (data.num_classes, data.in_channels, data.image_size) == (10, 3, 32)
    assert (data.train_size, data.test_size, len(data.train), len(data.test)) == (30, 20, 3, 1)
    # Test set: the PNGs, in sorted class order, with CIFAR-10's published statistics.
    x, y = epoch(data.test)
    assert torch.equal(y, written["test"][1])
    assert torch.equal(to_uint8(x, CIFAR10_MEAN, CIFAR10_STD), written["test"][0])
    # Train set: 4-pixel crops of its own image, some mirrored.
    x, y = epoch(data.train)
    src, lbl = written["train"]
    allowed = windows(src, 4, flip=True)  # (30, 162, ...); index k >= 81 is mirrored
    u = to_uint8(x, CIFAR10_MEAN, CIFAR10_STD)
    kinds = []
    for img, label in zip(u, y):
        hits = [
            (i, k)
            for i in (lbl == label).nonzero().flatten().tolist()
            for k in (allowed[i] == img).flatten(1).all(1).nonzero().flatten().tolist()
        ]
        assert hits, "augmented image is not a window of a training image of its class"
        kinds.append(hits[0][1])
    assert any(k >= 81 for k in kinds) and any(k < 81 for k in kinds)

    # channels_last: same values, NHWC memory (3 channels, so the two layouts differ).
    cl = D.load_data(cfg(dataset="cifar10", data_dir=str(root), batch_size=8), CPU, gen(), channels_last=True)
    (xa, _), (xb, _) = next(iter(data.train)), next(iter(cl.train))
    assert (
        xa.is_contiguous() and xb.is_contiguous(memory_format=torch.channels_last) and not xb.is_contiguous()
    )
    assert torch.equal(
        xb,
        next(iter(D.load_data(cfg(dataset="cifar10", data_dir=str(root), batch_size=8), CPU, gen()).train))[
            0
        ],
    )


def test_cifar_in_torchvisions_format(tmp_path, monkeypatch):
    """CIFAR-10 as torchvision downloads it (cifar-10-batches-py: pickled rows of 3,072 bytes,
    the red plane, then green, then blue): the images come back as written, in file order."""
    import pickle

    import torchvision

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    g, written = gen(5), {}
    for split, files in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        images = torch.randint(0, 256, (2 * len(files), 3, 32, 32), dtype=torch.uint8, generator=g)
        labels = torch.randint(0, 10, (len(images),), generator=g)
        for i, name in enumerate(files):
            rows = images[2 * i : 2 * i + 2].flatten(1).numpy()
            (folder / name).write_bytes(
                pickle.dumps({"data": rows, "labels": labels[2 * i : 2 * i + 2].tolist()})
            )
        written[split] = images, labels
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    # these files are not the real ones, whose MD5 sums torchvision checks
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)

    data = D.load_data(cfg(dataset="cifar10", data_dir=str(tmp_path), batch_size=4), CPU, gen())
    assert (data.num_classes, data.train_size, data.test_size) == (10, 10, 2)
    x, y = epoch(data.test)
    assert torch.equal(to_uint8(x, CIFAR10_MEAN, CIFAR10_STD), written["test"][0])
    assert torch.equal(y, written["test"][1])


def test_cifar_errors(tmp_path, monkeypatch):
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match=r"'data_dir'.*nope"):
        D.load_data(cfg(dataset="cifar10", data_dir=str(missing)), CPU, gen())

    def no_network(name, root):
        raise OSError("no network here")

    monkeypatch.setattr(D, "_download", no_network)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError) as e:
        D.load_data(cfg(dataset="cifar100", data_dir=str(empty)), CPU, gen())
    msg = str(e.value)
    for part in (
        "'data_dir'",
        str(empty),
        "cifar-100-python",
        "torchvision format",
        "ImageFolder",
        "no network here",
        "CIFAR-100",
    ):
        assert part in msg, (part, msg)

    few = tmp_path / "few"
    write_tree(few, {"train": 1, "test": 1}, ["a", "b", "c"])
    with pytest.raises(ConfigError, match=r"3 class folders.*needs the same 10"):
        D.load_data(cfg(dataset="cifar10", data_dir=str(few)), CPU, gen())

    broken = tmp_path / "broken"
    (broken / "cifar-10-batches-py").mkdir(parents=True)
    with pytest.raises(ConfigError, match="torchvision's format"):
        D.load_data(cfg(dataset="cifar10", data_dir=str(broken)), CPU, gen())

    large = tmp_path / "large"
    write_tree(large, {"train": 1, "test": 1}, [f"c{i}" for i in range(10)], size=40)
    with pytest.raises(ConfigError, match=r"ImageFolder image .*large.*\(3, 40, 40\); allowed: 3x32x32"):
        D.load_data(cfg(dataset="cifar10", data_dir=str(large)), CPU, gen())


@pytest.mark.parametrize(
    "content, why",
    [
        (b"not an image", "Unsupported image file"),
        (b"", "an empty file"),
        (b"\x89PNG\r\n\x1a\n truncated", ""),
    ],
)
def test_cifar_image_that_cannot_be_decoded_is_named(cifar_tree, content, why, capsys):
    """A corrupt or empty image: one error naming the file (lsq.train: exit 2), not a RuntimeError
    or ValueError traceback from the decoder."""
    from lsq.train import main

    root, _ = cifar_tree
    bad = root / "train" / "class4" / "0001.png"
    bad.write_bytes(content)
    with pytest.raises(
        ConfigError,
        match=rf"ImageFolder image {re.escape(str(bad))}: cannot be decoded \({why}.*\); allowed: an image",
    ):
        D.load_data(cfg(dataset="cifar10", data_dir=str(root)), CPU, gen())
    assert main(["--dataset", "cifar10", "--data_dir", str(root), "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: ImageFolder image {bad}: cannot be decoded") and err.count("\n") == 1


# ----------------------------------------------------------------------------------- ImageNet
def test_imagenet_image_folder(tmp_path):
    write_tree(tmp_path, {"train": 3, "val": 2}, ["n01", "n02"], size=64, fmt="jpg")
    data = D.load_data(cfg(dataset="imagenet", data_dir=str(tmp_path), workers=0, batch_size=4), CPU, gen())
    assert (data.num_classes, data.in_channels, data.image_size, data.train_size, data.test_size) == (
        2,
        3,
        224,
        6,
        4,
    )
    assert len(data.train) == 1  # 6 // 4, last partial batch dropped
    x, y = next(iter(data.train))
    assert x.shape == (4, 3, 224, 224) and x.dtype == torch.float32 and x.device == CPU
    assert y.dtype == torch.int64 and set(y.tolist()) <= {0, 1}
    x, y = epoch(data.test)
    assert x.shape == (4, 3, 224, 224) and y.tolist() == [0, 0, 1, 1]

    (tmp_path / "other").mkdir()
    with pytest.raises(ConfigError, match=r"no ImageNet found.*val"):
        D.load_data(cfg(dataset="imagenet", data_dir=str(tmp_path / "other")), CPU, gen())


@pytest.mark.parametrize("workers", [0, 1])
def test_imagenet_image_that_cannot_be_decoded_is_named(tmp_path, workers):
    """ImageNet's images are decoded as batches need them, in DataLoader workers or not: a corrupt
    one is one error naming the file, not PIL's traceback (in a worker's, wrapped in another)."""
    write_tree(tmp_path, {"train": 2, "val": 1}, ["n01", "n02"], size=64, fmt="jpg")
    bad = tmp_path / "val" / "n02" / "0000.jpg"
    bad.write_bytes(b"not a JPEG")
    data = D.load_data(
        cfg(dataset="imagenet", data_dir=str(tmp_path), workers=workers, batch_size=2), CPU, gen()
    )
    with pytest.raises(ConfigError) as e:
        epoch(data.test)
    assert str(e.value).startswith(f"ImageFolder image {bad}: cannot be decoded (cannot identify image file")
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value)


def test_trials_that_download_at_once_take_turns(tmp_path, monkeypatch):
    """A sweep's trials start together on an empty data_dir: one downloads while the others wait
    (they then find torchvision's archive complete), instead of all writing one file at once."""
    import threading

    inside, most, order = [0], [0], []

    def fake_download(name, root, download):
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        time.sleep(0.2)
        order.append(threading.current_thread().name)
        inside[0] -= 1
        return "data"

    monkeypatch.setattr(D, "_torchvision_cifar", fake_download)
    threads = [
        threading.Thread(target=D._download, args=("cifar10", str(tmp_path)), name=f"t{i}") for i in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1 and sorted(order) == ["t0", "t1", "t2"]
