"""`opticam ingest`: small replicas of each real download layout (real ILSVRC XML, real Kaggle
CSV, the chest_xray tree with its archive debris, Kvasir v2, an ImageFolder tree with a boxes CSV)
made of tiny real images, and every field of every row checked against what was put in."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import storage
from pipeline.cli import main as cli_main
from pipeline.datasets import IngestError, IngestOptions, ingest
from pipeline.schema import SAMPLES, SAMPLES_ROW_GROUP
from tests.s3server import ACCESS_KEY, SECRET_KEY

# --- tiny real images -----------------------------------------------------------------------


def _pixels(w, h, seed):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def encode(w, h, kind="rgb-jpeg", seed=0) -> bytes:
    rgb = Image.fromarray(_pixels(w, h, seed))
    buf = io.BytesIO()
    if kind == "rgb-jpeg":
        rgb.save(buf, "JPEG", quality=90)
    elif kind == "gray-jpeg":
        rgb.convert("L").save(buf, "JPEG")
    elif kind == "cmyk-jpeg":
        rgb.convert("CMYK").save(buf, "JPEG")
    elif kind == "rgb-png":
        rgb.save(buf, "PNG")
    elif kind == "gray-png":
        rgb.convert("L").save(buf, "PNG")
    elif kind == "png16":
        a = (np.random.default_rng(seed).random((h, w)) * 65535).astype(np.uint16)
        Image.fromarray(a).save(buf, "PNG")
    elif kind == "truncated-jpeg":
        rgb.save(buf, "JPEG", quality=95)
        return buf.getvalue()[: len(buf.getvalue()) // 2]
    else:
        raise ValueError(kind)
    return buf.getvalue()


def put(path, data: bytes | str) -> bytes:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = data.encode() if isinstance(data, str) else data
    with open(path, "wb") as f:
        f.write(data)
    return data


CORRUPT = b"this is not an image, whatever the extension says\n"

# --- ImageNet replica -----------------------------------------------------------------------

# (val id, wnid or None, expected torchvision/timm index, expected name, image kind, (w, h), boxes)
IMAGENET = [
    (1, "n01440764", 0, "tench, Tinca tinca", "rgb-jpeg", (40, 30), [(3, 4, 30, 25)]),
    (2, "n02119789", 278, "kit fox, Vulpes macrotis", "gray-jpeg", (36, 28), [(1, 2, 20, 21), (10, 5, 35, 27)]),
    (3, "n15075141", 999, "toilet tissue, toilet paper, bathroom tissue", "cmyk-jpeg", (32, 32), [(0, 0, 31, 31)]),
    (4, "n01443537", 1, "goldfish, Carassius auratus", "rgb-jpeg", (50, 20), [(7, 1, 44, 19)]),
    (5, "n01440764", 0, "tench, Tinca tinca", "corrupt", (10, 10), [(1, 1, 5, 5)]),
    (6, None, None, None, "rgb-jpeg", (12, 12), []),  # an image with no annotation
    (7, "n02119789", 278, "kit fox, Vulpes macrotis", "truncated-jpeg", (64, 48), [(2, 2, 60, 40)]),
]
GOOD_VAL = {1, 2, 3, 4}


def val_id(i):
    return f"ILSVRC2012_val_{i:08d}"


def ilsvrc_xml(i, wnid, size, boxes) -> str:
    objects = "".join(
        f"""	<object>
		<name>{wnid}</name>
		<pose>Unspecified</pose>
		<truncated>0</truncated>
		<difficult>0</difficult>
		<bndbox>
			<xmin>{b[0]}</xmin>
			<ymin>{b[1]}</ymin>
			<xmax>{b[2]}</xmax>
			<ymax>{b[3]}</ymax>
		</bndbox>
	</object>
""" for b in boxes)
    return f"""<annotation>
	<folder>val</folder>
	<filename>{val_id(i)}</filename>
	<source>
		<database>ILSVRC_2012</database>
	</source>
	<size>
		<width>{size[0]}</width>
		<height>{size[1]}</height>
		<depth>3</depth>
	</size>
	<segmented>0</segmented>
{objects}</annotation>
"""


def solution_csv() -> str:
    lines = ["ImageId,PredictionString"]
    for i, wnid, _, _, _, _, boxes in reversed(IMAGENET):  # Kaggle's file is not sorted
        if wnid:
            lines.append(f"{val_id(i)}," + "".join(f"{wnid} {b[0]} {b[1]} {b[2]} {b[3]} " for b in boxes))
    return "\n".join(lines) + "\n"


def make_imagenet(root, *, kaggle=False) -> dict[str, bytes]:
    """Images (+ XML next to nothing: annotations go where each layout keeps them)."""
    images_dir = os.path.join(root, "ILSVRC/Data/CLS-LOC/val") if kaggle else os.path.join(root, "val")
    xml_dir = os.path.join(root, "ILSVRC/Annotations/CLS-LOC/val") if kaggle else os.path.join(root, "bbox_val")
    data = {}
    for i, wnid, _, _, kind, (w, h), boxes in IMAGENET:
        payload = CORRUPT if kind == "corrupt" else encode(w, h, kind, seed=i)
        data[val_id(i)] = put(os.path.join(images_dir, val_id(i) + ".JPEG"), payload)
        if wnid:
            put(os.path.join(xml_dir, val_id(i) + ".xml"), ilsvrc_xml(i, wnid, (w, h), boxes))
    if kaggle:
        put(os.path.join(root, "LOC_val_solution.csv"), solution_csv())
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        put(os.path.join(root, "LOC_synset_mapping.txt"), "".join(
            f"{info.index_to_label_name(k)} {info.index_to_description(k)}\n" for k in range(1000)))
        put(os.path.join(root, "ILSVRC/Data/CLS-LOC/train/n01440764/n01440764_10026.JPEG"), encode(8, 8))
        put(os.path.join(root, "LOC_sample_submission.csv"), "ImageId,PredictionString\n")
    return data


# --- reading an ingest back -----------------------------------------------------------------


def read_rows(uri) -> dict[str, dict]:
    fs, path = storage.filesystem(uri)
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table()
    assert table.schema.equals(SAMPLES), table.schema
    rows = table.to_pylist()
    ids = [r["sample_id"] for r in rows]
    assert len(ids) == len(set(ids)), "a sample was written twice"
    return {r["sample_id"]: r for r in rows}


def row_group_sizes(uri) -> list[list[int]]:
    fs, path = storage.filesystem(uri)
    out = []
    for info in sorted(fs.get_file_info(pafs.FileSelector(path)), key=lambda i: i.path):
        if info.path.endswith(".parquet"):
            md = pq.ParquetFile(fs.open_input_file(info.path)).metadata
            out.append([md.row_group(g).num_rows for g in range(md.num_row_groups)])
    return out


def boxes_of(row):
    return [(b["x0"], b["y0"], b["x1"], b["y1"]) for b in row["boxes"]]


def report_of(uri) -> dict:
    return json.loads(storage.read_text(storage.join(uri, "_ingest.json")))


def check_imagenet_rows(rows, data, split="val", dataset="imagenet"):
    assert set(rows) == {val_id(i) for i in GOOD_VAL}
    for i, wnid, label, name, kind, (w, h), boxes in IMAGENET:
        if i not in GOOD_VAL:
            continue
        r = rows[val_id(i)]
        assert r["dataset"] == dataset and r["split"] == split
        assert r["label"] == label and r["label_name"] == name
        assert boxes_of(r) == [tuple(float(v) for v in b) for b in boxes]
        assert (r["width"], r["height"]) == (w, h)
        assert r["image"] == data[val_id(i)]


# --- ImageNet -------------------------------------------------------------------------------


def test_imagenet_xml_annotations(tmp_path):
    data = make_imagenet(tmp_path / "src")
    out = str(tmp_path / "out")
    report = ingest(IngestOptions("imagenet", str(tmp_path / "src/val"), out, boxes=str(tmp_path / "src/bbox_val"),
                                  row_group=2, shard_size=2), log=lambda m: None)
    rows = read_rows(out)
    check_imagenet_rows(rows, data)
    assert report["counts"] == {"listed": 6, "written": 4, "bad": 2, "skipped": 1, "ignored": 0, "failed_shards": 0}
    assert {b["sample_id"] for b in report["bad"]} == {val_id(5), val_id(7)}
    assert "truncated" in next(b["reason"] for b in report["bad"] if b["sample_id"] == val_id(7))
    assert [s["path"] for s in report["skipped"]] == [val_id(6) + ".JPEG"]
    assert report["class_keys"][0] == "n01440764" and report["class_keys"] == sorted(report["class_keys"])
    assert len(report["classes"]) == 1000 and report["classes"][278] == "kit fox, Vulpes macrotis"
    # shards of 2 candidates; shard 2 (ids 5 and 7) has no good image and leaves no file
    assert row_group_sizes(out) == [[2], [2]]
    assert [s["name"] for s in report["shards"]] == ["part-00000.parquet", "part-00001.parquet"]
    assert report_of(out) == report


def test_imagenet_kaggle_layout_csv_equals_xml(tmp_path):
    data = make_imagenet(tmp_path / "kaggle", kaggle=True)
    out_csv, out_xml = str(tmp_path / "csv"), str(tmp_path / "xml")
    ingest(IngestOptions("imagenet", str(tmp_path / "kaggle"), out_csv), log=lambda m: None)  # finds the CSV
    ingest(IngestOptions("imagenet", str(tmp_path / "kaggle"), out_xml,
                         boxes=str(tmp_path / "kaggle/ILSVRC/Annotations/CLS-LOC/val")), log=lambda m: None)
    rows_csv, rows_xml = read_rows(out_csv), read_rows(out_xml)
    check_imagenet_rows(rows_csv, data)
    assert rows_csv == rows_xml
    report = report_of(out_csv)
    assert report["counts"]["written"] == 4 and report["counts"]["bad"] == 2
    assert row_group_sizes(out_csv) == [[4]]  # default row group: everything in one group


def test_imagenet_devkit_tgz_and_class_list(tmp_path):
    data = make_imagenet(tmp_path / "src")
    tgz = tmp_path / "ILSVRC2012_bbox_val_v3.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(tmp_path / "src/bbox_val", arcname="val")
    # a class list in Kaggle's mapping format, deliberately unsorted: indices follow sorted wnids
    put(str(tmp_path / "synsets.txt"), "n15075141 toilet tissue\nn01443537 goldfish\n"
                  "n02119789 kit fox\nn01440764 tench\n")
    out = str(tmp_path / "out")
    report = ingest(IngestOptions("imagenet", str(tmp_path / "src/val"), out, boxes=str(tgz),
                                  classes=str(tmp_path / "synsets.txt"), split="val2012", name="imagenet-val"),
                    log=lambda m: None)
    rows = read_rows(out)
    expect = {1: (0, "tench"), 2: (2, "kit fox"), 3: (3, "toilet tissue"), 4: (1, "goldfish")}
    for i, (label, name) in expect.items():
        r = rows[val_id(i)]
        assert (r["label"], r["label_name"], r["split"], r["dataset"]) == (label, name, "val2012", "imagenet-val")
        assert r["image"] == data[val_id(i)]
    assert report["class_keys"] == ["n01440764", "n01443537", "n02119789", "n15075141"]


def test_imagenet_names_match_timm():
    from timm.data import ImageNetInfo

    from pipeline.datasets.imagenet import _timm_names

    info, names = ImageNetInfo(), _timm_names()
    assert list(names) == info.label_names() == sorted(names)
    assert list(names.values()) == [info.index_to_description(k) for k in range(1000)]


def test_imagenet_without_annotations_is_an_error(tmp_path):
    make_imagenet(tmp_path / "src")
    with pytest.raises(IngestError, match="--boxes"):
        ingest(IngestOptions("imagenet", str(tmp_path / "src/val"), str(tmp_path / "out")), log=lambda m: None)
    assert not os.path.exists(tmp_path / "out")


# --- Chest X-ray ----------------------------------------------------------------------------

CHEST = [  # (split, class, file, kind, size)
    ("train", "NORMAL", "IM-0115-0001.jpeg", "gray-jpeg", (30, 20)),
    ("train", "PNEUMONIA", "person1_bacteria_1.jpeg", "gray-jpeg", (31, 21)),
    ("train", "PNEUMONIA", "person1_virus_6.jpeg", "rgb-jpeg", (32, 22)),
    ("val", "NORMAL", "NORMAL2-IM-1427-0001.jpeg", "gray-jpeg", (33, 23)),
    ("val", "PNEUMONIA", "person1946_bacteria_4874.jpeg", "gray-jpeg", (34, 24)),
    ("test", "NORMAL", "IM-0001-0001.jpeg", "gray-jpeg", (35, 25)),
    ("test", "NORMAL", "IM-0115-0001.jpeg", "gray-jpeg", (36, 26)),  # same name as in train
    ("test", "PNEUMONIA", "person100_bacteria_475.jpeg", "corrupt", (10, 10)),
]


def make_chest(root) -> dict[str, bytes]:
    data = {}
    for k, (split, cls, name, kind, (w, h)) in enumerate(CHEST):
        payload = CORRUPT if kind == "corrupt" else encode(w, h, kind, seed=k)
        data[f"{split}/{cls}/{name}"] = put(os.path.join(root, "chest_xray", split, cls, name), payload)
        # the Kaggle archive's nested duplicate and macOS debris
        put(os.path.join(root, "chest_xray", "chest_xray", split, cls, name), payload)
        put(os.path.join(root, "chest_xray", "__MACOSX", split, cls, "._" + name), b"\x00\x05\x16\x07")
    put(os.path.join(root, "chest_xray", "train", ".DS_Store"), b"\x00\x00\x00\x01Bud1")
    return data


def test_chestxray(tmp_path):
    data = make_chest(tmp_path)
    out = str(tmp_path / "out")
    report = ingest(IngestOptions("chestxray", str(tmp_path), out, row_group=3), log=lambda m: None)
    rows = read_rows(out)
    good = [c for c in CHEST if c[3] != "corrupt"]
    assert set(rows) == {f"{s}/{c}/{n}" for s, c, n, _, _ in good}
    for split, cls, name, kind, (w, h) in good:
        r = rows[f"{split}/{cls}/{name}"]
        assert (r["dataset"], r["split"], r["label"], r["label_name"]) == ("chestxray", split, {"NORMAL": 0, "PNEUMONIA": 1}[cls], cls)
        assert r["boxes"] == [] and (r["width"], r["height"]) == (w, h)
        assert r["image"] == data[f"{split}/{cls}/{name}"]
    assert report["counts"]["bad"] == 1 and report["bad"][0]["sample_id"] == "test/PNEUMONIA/person100_bacteria_475.jpeg"
    assert report["counts"]["ignored"] == 2 * len(CHEST) + 1  # the nested copy, ._ files, .DS_Store
    assert any("second copy" in w for w in report["warnings"])
    assert all(size <= 3 for shard in row_group_sizes(out) for size in shard)
    assert report["classes"] == ["NORMAL", "PNEUMONIA"]
    # one split only
    ingest(IngestOptions("chestxray", str(tmp_path / "chest_xray"), out, split="test", overwrite=True), log=lambda m: None)
    assert set(read_rows(out)) == {"test/NORMAL/IM-0001-0001.jpeg", "test/NORMAL/IM-0115-0001.jpeg"}


# --- Kvasir ---------------------------------------------------------------------------------

KVASIR = ["dyed-lifted-polyps", "dyed-resection-margins", "esophagitis", "normal-cecum",
          "normal-pylorus", "normal-z-line", "polyps", "ulcerative-colitis"]


def test_kvasir(tmp_path):
    data = {}
    for k, cls in enumerate(reversed(KVASIR)):  # creation order must not matter
        rel = f"{cls}/{k:02d}a1b2c3-{cls[:3]}.jpg"
        data[rel] = put(str(tmp_path / "kvasir-dataset-v2" / rel), encode(20 + k, 16, seed=k))
    out = str(tmp_path / "out")
    # --split all: every image under one split (the default is the paper's stratified split,
    # tests/test_finetune.py)
    report = ingest(IngestOptions("kvasir", str(tmp_path), out, split="all"), log=lambda m: None)
    rows = read_rows(out)
    assert set(rows) == set(data)
    for rel, payload in data.items():
        r = rows[rel]
        cls = rel.split("/")[0]
        assert (r["dataset"], r["split"], r["label"], r["label_name"]) == ("kvasir", "all", KVASIR.index(cls), cls)
        assert r["image"] == payload and r["boxes"] == [] and r["height"] == 16
        assert r["width"] == 20 + (7 - KVASIR.index(cls))
    assert report["classes"] == KVASIR and not report["warnings"]


# --- ImageFolder + boxes CSV ----------------------------------------------------------------

FOLDER = [  # (relative path, kind, size)
    ("a_cat/0001.jpg", "rgb-jpeg", (40, 30)),
    ("a_cat/0002.png", "png16", (21, 13)),
    ("a_cat/more/0003.jpg", "cmyk-jpeg", (25, 17)),
    ("b_dog/0001.jpg", "gray-jpeg", (19, 23)),
    ("b_dog/0002.png", "gray-png", (8, 9)),
    ("b_dog/broken.jpg", "corrupt", (1, 1)),
    ("b_dog/cut.jpg", "truncated-jpeg", (64, 64)),
    ("c_bird/0001.png", "rgb-png", (33, 12)),
]
FOLDER_BOXES = "path,x0,y0,x1,y1\na_cat/0001.jpg,1.5,2,30,25.25\nb_dog/0001.jpg,0,0,18,22\n" \
               "./a_cat/0001.jpg,10,11,12,13\nnot/there.jpg,1,1,2,2\n"


def make_folder(root) -> dict[str, bytes]:
    data = {rel: put(os.path.join(root, rel), CORRUPT if kind == "corrupt" else encode(w, h, kind, seed=k))
            for k, (rel, kind, (w, h)) in enumerate(FOLDER)}
    put(os.path.join(root, "README.txt"), "not a class\n")
    return data


def test_folder_with_boxes_and_odd_images(tmp_path):
    src = tmp_path / "pets"
    data = make_folder(src)
    put(str(tmp_path / "boxes.csv"), FOLDER_BOXES)
    out = str(tmp_path / "out")
    report = ingest(IngestOptions("folder", str(src), out, boxes=str(tmp_path / "boxes.csv"), row_group=2, shard_size=3,
                                  workers=2), log=lambda m: None)
    rows = read_rows(out)
    good = {rel: (kind, size) for rel, kind, size in FOLDER if kind not in ("corrupt", "truncated-jpeg")}
    assert set(rows) == set(good)
    expected_boxes = {"a_cat/0001.jpg": [(1.5, 2.0, 30.0, 25.25), (10.0, 11.0, 12.0, 13.0)], "b_dog/0001.jpg": [(0.0, 0.0, 18.0, 22.0)]}
    for rel, (kind, (w, h)) in good.items():
        r = rows[rel]
        cls = rel.split("/")[0]
        assert (r["dataset"], r["split"], r["label"], r["label_name"]) == ("pets", "all", ["a_cat", "b_dog", "c_bird"].index(cls), cls)
        assert (r["width"], r["height"]) == (w, h) and r["image"] == data[rel]
        assert boxes_of(r) == expected_boxes.get(rel, [])
    assert Image.open(io.BytesIO(rows["a_cat/0002.png"]["image"])).mode == "I;16"
    assert Image.open(io.BytesIO(rows["a_cat/more/0003.jpg"]["image"])).mode == "CMYK"
    assert sorted(b["sample_id"] for b in report["bad"]) == ["b_dog/broken.jpg", "b_dog/cut.jpg"]
    assert report["ignored"] == ["README.txt"]
    assert any("not/there.jpg" in w for w in report["warnings"])
    # 8 candidates in shards of 4 (3 rounded up to whole row groups of 2): the second shard lost 2 bad files
    assert row_group_sizes(out) == [[2, 2], [1, 1]]


def test_folder_class_list_and_header_check(tmp_path):
    src = tmp_path / "pets"
    make_folder(src)
    put(str(tmp_path / "classes.txt"), "# label order\nc_bird\na_cat\n")
    out = str(tmp_path / "out")
    report = ingest(IngestOptions("folder", str(src), out, classes=str(tmp_path / "classes.txt"), check="header",
                                  split="test"), log=lambda m: None)
    rows = read_rows(out)
    # b_dog is not in the list; with header-only checks the truncated JPEG passes (its header is whole)
    assert set(rows) == {"a_cat/0001.jpg", "a_cat/0002.png", "a_cat/more/0003.jpg", "c_bird/0001.png"}
    assert {r["label_name"]: r["label"] for r in rows.values()} == {"c_bird": 0, "a_cat": 1}
    assert all(r["split"] == "test" for r in rows.values())
    assert any("b_dog" in w for w in report["warnings"])


def test_limit_takes_first_ids(tmp_path):
    src = tmp_path / "pets"
    make_folder(src)
    out = str(tmp_path / "out")
    ingest(IngestOptions("folder", str(src), out, limit=3), log=lambda m: None)
    assert sorted(read_rows(out)) == ["a_cat/0001.jpg", "a_cat/0002.png", "a_cat/more/0003.jpg"]


def test_bad_boxes_csv(tmp_path):
    make_folder(tmp_path / "pets")
    put(str(tmp_path / "b.csv"), "path,x0,y0,x1\na_cat/0001.jpg,1,2,3\n")
    with pytest.raises(IngestError, match="lacks columns"):
        ingest(IngestOptions("folder", str(tmp_path / "pets"), str(tmp_path / "o"), boxes=str(tmp_path / "b.csv")), log=lambda m: None)
    put(str(tmp_path / "b.csv"), "path,x0,y0,x1,y1\na_cat/0001.jpg,1,2,three,4\n")
    with pytest.raises(IngestError, match="line 2"):
        ingest(IngestOptions("folder", str(tmp_path / "pets"), str(tmp_path / "o"), boxes=str(tmp_path / "b.csv")), log=lambda m: None)


# --- the command line, overwrite rules ------------------------------------------------------


def test_cli_reports_bad_files_and_refuses_to_overwrite(tmp_path, capsys):
    src = tmp_path / "pets"
    make_folder(src)
    out = str(tmp_path / "out")
    assert cli_main(["ingest", "folder", str(src), "--output", out, "--row-group", "4"]) == 0
    printed = capsys.readouterr()
    assert "2 files are not decodable images" in printed.out
    assert "b_dog/broken.jpg" in printed.out and "b_dog/cut.jpg" in printed.out
    assert "ingest:" in printed.err  # progress
    first = read_rows(out)
    assert len(first) == 6 and row_group_sizes(out) == [[4, 2]]

    assert cli_main(["ingest", "folder", str(src), "--output", out]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert read_rows(out) == first  # untouched

    os.remove(src / "c_bird/0001.png")
    assert cli_main(["ingest", "folder", str(src), "--output", out, "--overwrite", "--row-group", "4"]) == 0
    assert set(read_rows(out)) == set(first) - {"c_bird/0001.png"}

    put(os.path.join(out, "notes.txt"), "mine")
    assert cli_main(["ingest", "folder", str(src), "--output", out, "--overwrite"]) == 2
    assert "refusing to delete" in capsys.readouterr().err
    assert os.path.exists(os.path.join(out, "notes.txt"))


def test_default_row_group_is_the_schema_constant(tmp_path):
    src = tmp_path / "many"
    for k in range(SAMPLES_ROW_GROUP + 3):
        put(str(src / "only" / f"{k:04d}.png"), encode(2, 2, "gray-png", seed=k))
    out = str(tmp_path / "out")
    ingest(IngestOptions("folder", str(src), out), log=lambda m: None)
    assert row_group_sizes(out) == [[SAMPLES_ROW_GROUP, 3]]


# --- S3 (moto server on loopback), threads path ---------------------------------------------


def test_s3_source_and_output_without_leaking_credentials(tmp_path, s3_prefix, s3_server, capsys):
    src_local = tmp_path / "pets"
    data = make_folder(src_local)
    put(str(tmp_path / "boxes.csv"), FOLDER_BOXES)
    # the source on S3 too: the same tree uploaded
    src = storage.join(s3_prefix, "raw/pets")
    for rel in [*data, "README.txt"]:
        storage.write_bytes(storage.join(src, rel), (src_local / rel).read_bytes())
    out = storage.join(s3_prefix, "samples")
    code = cli_main(["ingest", "folder", src, "--output", out, "--boxes", str(tmp_path / "boxes.csv"),
                     "--row-group", "2", "--name", "pets"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    rows = read_rows(out)
    local_out = str(tmp_path / "local")
    ingest(IngestOptions("folder", str(src_local), local_out, boxes=str(tmp_path / "boxes.csv"), row_group=2),
           log=lambda m: None)
    assert rows == read_rows(local_out)
    assert row_group_sizes(out) == row_group_sizes(local_out)
    bucket_prefix = s3_prefix[len("s3://"):].split("/", 1)[1]
    keys = s3_server.keys(bucket_prefix + "samples/")
    assert [k.rsplit("/", 1)[1] for k in keys] == ["_ingest.json", "part-00000.parquet"]
    report_text = storage.read_text(storage.join(out, "_ingest.json"))
    for text in (printed.out, printed.err, report_text):
        assert SECRET_KEY not in text and ACCESS_KEY not in text
    assert json.loads(report_text)["counts"]["bad"] == 2


def test_failed_shard_leaves_no_report(tmp_path, monkeypatch):
    """A shard that dies (storage error, killed worker) is named, and the missing _ingest.json
    tells readers the output is incomplete."""
    import pipeline.datasets.driver as driver

    real = driver.write_shard

    def flaky(index, *args):
        if index == 1:
            raise OSError("disk full")
        return real(index, *args)

    monkeypatch.setattr(driver, "write_shard", flaky)
    make_folder(tmp_path / "pets")
    out = str(tmp_path / "out")
    report = ingest(IngestOptions("folder", str(tmp_path / "pets"), out, row_group=2, shard_size=2), log=lambda m: None)
    assert report["failures"] == ["shard 1: OSError: disk full"] and report["counts"]["failed_shards"] == 1
    assert not os.path.exists(os.path.join(out, "_ingest.json"))
    assert set(read_rows(out)) == {"a_cat/0001.jpg", "a_cat/0002.png", "b_dog/0002.png", "c_bird/0001.png"}
