"""Build SA-1B-style and img2dataset-style tars for the tests."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tests import image_factory as mk


def add_bytes(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def sa1b_annotation(image_id: int, masks: int) -> bytes:
    return json.dumps(
        {
            "image": {"image_id": image_id, "width": 300, "height": 200, "file_name": f"sa_{image_id}.jpg"},
            "annotations": [{"id": i, "segmentation": {"size": [200, 300], "counts": "xyz"}} for i in range(masks)],
        }
    ).encode()


def write_hostile_sa1b_tar(path: Path) -> Path:
    """Two good samples, plus malformed json, path-escaping names and a symlink."""
    photo = mk.jpeg_bytes(mk.photo_image((300, 200)))
    with tarfile.open(path, "w") as tf:
        add_bytes(tf, "sa_1.jpg", photo)
        add_bytes(tf, "sa_1.json", sa1b_annotation(1, masks=3))
        add_bytes(tf, "sa_2.jpg", photo)
        add_bytes(tf, "sa_2.json", b'{"image": {"image_id": 2,')  # malformed
        add_bytes(tf, "../../escaped.jpg", photo)
        add_bytes(tf, "/abs/escaped.jpg", photo)
        link = tarfile.TarInfo("sa_3.jpg")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tf.addfile(link)
        add_bytes(tf, "sa_4.jpg", photo)  # no json: written without SA-1B metadata
    return path


def write_img2dataset_output(out: Path, n: int = 3) -> Path:
    """An img2dataset output folder: 00000.tar + 00000.parquet + 00000_stats.json."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tarfile.open(out / "00000.tar", "w") as tf:
        for i in range(n):
            key = f"{i:09d}"
            meta = {"url": f"https://example.com/{i}.jpg", "key": key, "status": "success", "caption": f"photo {i}"}
            add_bytes(tf, f"{key}.jpg", mk.jpeg_bytes(mk.photo_image((320 + i, 240))))
            add_bytes(tf, f"{key}.txt", f"a cup of coffee number {i}".encode())
            add_bytes(tf, f"{key}.json", json.dumps(meta).encode())
            rows.append({"key": key, "url": meta["url"], "caption": meta["caption"], "status": "success"})
    pq.write_table(pa.Table.from_pylist(rows), out / "00000.parquet")
    (out / "00000_stats.json").write_text(json.dumps({"count": n, "successes": n}))
    return out
