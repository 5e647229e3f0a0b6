"""The datasets as people download them (docs/datasets.md §2.1, §3, §5, §7): NIH's Kaggle and other image layouts,
numbered impressions in MIMIC-CXR and Open-i reports, Open-i's views file, an RSNA image left as DICOM, CheXpert's
lateral views. Small excerpts written by hand in the exact real formats; each test would fail on the loaders as
they were before these layouts were supported."""
import collections
import dataclasses
import json

import numpy as np
import pytest
import torch
from test_data import OPENI_XML, make_openi, mimic_report

import data
import eval_zeroshot as ez
import train
from fixtures_eval import RSNA_IDS, make_chexpert, make_rsna, write_image, write_text
from maco import MaCo, MaCoConfig
from util import eval_datasets
from util.cli import parse_config
from util.tokenizer import train_tokenizer
from world.synthetic import label_report

# ----------------------------------------------------------------------------- NIH ChestX-ray14 (§2)

# Kaggle's Data_Entry_2017.csv: `Patient Gender` and a trailing comma on every line (§2.3); rows in name order
NIH_KAGGLE_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
                     "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")
NIH_ROWS = [
    "00000001_000.png,Cardiomegaly,0,1,58,M,PA,2682,2749,0.143,0.143,",
    "00000001_001.png,Cardiomegaly|Emphysema,1,1,58,M,PA,2894,2729,0.143,0.143,",
    "00000003_000.png,Hernia,0,3,81,F,PA,2582,2991,0.143,0.143,",
    "00001336_000.png,No Finding,0,1336,58,M,PA,2500,2048,0.168,0.168,",
    "00003923_013.png,Infiltration|Nodule,13,3923,45,F,AP,2500,2048,0.168,0.168,",
    "00006585_007.png,Effusion|Infiltration|Pneumothorax,7,6585,53,M,AP,2500,2048,0.168,0.168,",
    "00009232_004.png,No Finding,4,9232,60,F,PA,2992,2991,0.143,0.143,",
    "00011558_008.png,Atelectasis|Consolidation|Edema,8,11558,31,M,AP,3056,2544,0.139,0.139,",
    "00013774_026.png,Mass|Pleural_Thickening,26,13774,70,F,PA,2021,2021,0.194311,0.194311,",
    "00016051_010.png,Pneumonia|Fibrosis,10,16051,43,M,PA,2992,2991,0.143,0.143,",
    "00018387_035.png,No Finding,35,18387,29,F,PA,2021,2021,0.194311,0.194311,",
    "00023313_002.png,Effusion|Pneumothorax|Pleural_Thickening,2,23313,40,F,PA,2048,2500,0.168,0.168,",
    "00030805_000.png,No Finding,0,30805,39,M,PA,2048,2500,0.168,0.168,",
]
NIH_NAMES = [row.split(",")[0] for row in NIH_ROWS]
# the official list form (names only, CRLF, no final newline); its first image is in Kaggle's last folder
NIH_LISTED = NIH_NAMES[::-1]
KAGGLE_FOLDERS = "images_001/images/, …, images_012/images/ (12 folders)"
NIH_LAYOUTS = {  # layout: (folder of the i-th image in name order, how the loader describes where it found them)
    "official": (lambda i: "images", "images/"),
    "kaggle": (lambda i: f"images_{max(i, 1):03d}/images", KAGGLE_FOLDERS),  # 12 archives, in name order
    "maco": (lambda i: "images/images_all", "images/images_all/"),
    "flat": (lambda i: ".", "the root folder"),
}


def make_nih_download(root, layout: str):
    """The CSV, the name list and one PNG per row in `layout`; returns the image paths by name."""
    write_text(root / "Data_Entry_2017.csv", NIH_KAGGLE_HEADER + "\n" + "\n".join(NIH_ROWS) + "\n")
    write_text(root / "test_list.txt", "\n".join(NIH_LISTED), newline="\r\n")
    folder_of = NIH_LAYOUTS[layout][0]
    return {name: write_image(root / folder_of(i) / name, (8, 8)) for i, name in enumerate(NIH_NAMES)}


@pytest.mark.parametrize("layout", list(NIH_LAYOUTS))
def test_nih_finds_every_listed_image_in_each_download_layout(tmp_path, layout, capsys):
    paths = make_nih_download(tmp_path, layout)
    items = eval_datasets.load_nih(tmp_path)
    assert [item.path for item in items] == [str(paths[name]) for name in NIH_LISTED]
    out = capsys.readouterr().out
    assert f"13 of 13 listed images found in {NIH_LAYOUTS[layout][1]}\n" in out and "skipped" not in out


def test_nih_kaggle_labels_match_an_independent_count_of_the_csv(tmp_path):
    make_nih_download(tmp_path, "kaggle")
    labels = np.stack([item.labels for item in eval_datasets.load_nih(tmp_path)])  # (13, 14)
    counted = collections.Counter(label for row in NIH_ROWS for label in row.split(",")[1].split("|"))
    assert dict(zip(eval_datasets.NIH_LABELS, labels.sum(0).tolist())) == {
        name: counted[name] for name in eval_datasets.NIH_LABELS}
    assert int((labels.sum(1) == 0).sum()) == counted["No Finding"] == 4  # "No Finding" is all zeros
    row = NIH_LISTED.index("00006585_007.png")  # "A|B|C": exactly those three
    assert {eval_datasets.NIH_LABELS[c] for c in np.flatnonzero(labels[row])} == {"Effusion", "Infiltration",
                                                                                 "Pneumothorax"}


def test_nih_flat_folder_whose_first_listed_image_is_missing_keeps_the_rest(tmp_path, capsys):
    paths = make_nih_download(tmp_path, "flat")
    paths[NIH_LISTED[0]].unlink()
    items = eval_datasets.load_nih(tmp_path)
    assert [item.path for item in items] == [str(paths[name]) for name in NIH_LISTED[1:]]
    out = capsys.readouterr().out
    assert "12 of 13 listed images found in the root folder" in out and "skipped 1 of 13" in out


def test_nih_without_any_listed_image_names_the_layouts_it_searched(tmp_path):
    make_nih_download(tmp_path, "kaggle")
    write_text(tmp_path / "test_list.txt", "00099999_000.png\r\n00099999_001.png")
    write_text(tmp_path / "Data_Entry_2017.csv", NIH_KAGGLE_HEADER + "\n" + "00099999_000.png,Mass,0,99999,50,M,PA,"
               "2048,2500,0.168,0.168,\n00099999_001.png,No Finding,1,99999,50,M,PA,2048,2500,0.168,0.168,\n")
    with pytest.raises(FileNotFoundError, match=r"none of the 2 images listed in test_list\.txt \(e\.g\. "
                       r"00099999_000\.png\) is among the 13 PNG/JPEG files in .* and every folder below it \(the "
                       r"layouts images/ \(NIH archives\), images_001/images/ … images_012/images/ \(Kaggle\), "
                       r"images/images_all/ \(MaCo\) and flat"):
        eval_datasets.load_nih(tmp_path)


def test_nih_image_dir_limits_the_search_to_that_folder(tmp_path, capsys):
    paths = make_nih_download(tmp_path, "kaggle")
    items = eval_datasets.load_nih(tmp_path, image_dir="images_003")  # relative to root: one archive only
    assert [item.path for item in items] == [str(paths["00001336_000.png"])]
    assert "1 of 13 listed images found in images_003/images/" in capsys.readouterr().out
    absolute = eval_datasets.load_nih(tmp_path, image_dir=str(tmp_path / "images_012"))
    assert [item.path for item in absolute] == [str(paths["00030805_000.png"])]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"among the 0 PNG/JPEG files in .*empty and every folder below it "
                                                r"\(--image-dir"):
        eval_datasets.load_nih(tmp_path, image_dir="empty")
    with pytest.raises(FileNotFoundError, match=r"NIH image folder .*nowhere \(--image-dir\) is not a folder"):
        eval_datasets.load_nih(tmp_path, image_dir="nowhere")


# ----------------------------------------------------------------------------- RSNA Pneumonia (§3)

def test_rsna_one_image_left_as_dicom_is_a_counted_skip(tmp_path, capsys):
    make_rsna(tmp_path)
    leftover = tmp_path / "stage_2_train_images" / f"{RSNA_IDS[1]}.png"
    leftover.unlink()
    write_text(leftover.with_suffix(".dcm"), "DICM")
    items = eval_datasets.load_rsna(tmp_path, "test_list.txt")
    assert [item.path.split("/")[-1] for item in items] == [f"{RSNA_IDS[0]}.png", f"{RSNA_IDS[2]}.png"]
    assert [item.labels.tolist() for item in items] == [[0.0], [1.0]]
    out = capsys.readouterr().out
    assert f"skipped 1 of 3 listed images that are still DICOM (e.g. {leftover.with_suffix('.dcm')})" in out
    assert "convert them to PNG or JPEG" in out
    # without a list, the training patients of the labels CSV: the two box rows of the leftover collapse to it
    assert [item.path.split("/")[-1] for item in eval_datasets.load_rsna(tmp_path, None)] == [f"{RSNA_IDS[0]}.png"]


def test_rsna_folder_of_dicom_files_and_missing_ones_keeps_the_convert_first_error(tmp_path):
    make_rsna(tmp_path, dicom_only=True)
    (tmp_path / "stage_2_test_images" / f"{RSNA_IDS[2]}.dcm").unlink()  # missing, the other two DICOM
    with pytest.raises(ValueError, match=r"\.dcm is a DICOM file.*Convert the images to PNG or JPEG"):
        eval_datasets.load_rsna(tmp_path, "test_list.txt")


# ----------------------------------------------------------------------------- CheXpert (§5)

def test_chexpert_benchmark_is_frontal_only_by_default_and_counts_the_laterals(tmp_path, capsys):
    make_chexpert(tmp_path)
    (task, _, _), _ = eval_datasets.load_benchmark("chexpert", tmp_path, 16, 1, split="train")
    assert [item.path.split("/")[-1] for item in task.items] == ["view1_frontal.jpg", "view1_frontal.jpg"]
    assert "train.csv: 2 frontal images; dropped 1 lateral (--no-frontal-only keeps them)" in capsys.readouterr().out
    (every, _, _), _ = eval_datasets.load_benchmark("chexpert", tmp_path, 16, 1, split="train", frontal_only=False)
    assert [item.path.split("/")[-1] for item in every.items][-1] == "view2_lateral.jpg"
    assert "lateral" not in capsys.readouterr().out


def test_chexpert_ignore_policy_makes_every_uncertain_label_nan_and_blanks_zero(tmp_path):
    make_chexpert(tmp_path)
    items = eval_datasets.load_chexpert(tmp_path, "train", "ignore", frontal_only=False)
    assert np.isnan(items[1].labels).all()  # -1.0 in all five competition columns
    assert items[0].labels.tolist() == [0, 0, 0, 0, 0]  # blanks and 0.0
    # the lateral: Consolidation -1.0 (uncertain, ignored), Lung Opacity 1.0 (not one of the five), the rest blank
    np.testing.assert_array_equal(items[2].labels, [0, 0, np.nan, 0, 0])


# ----------------------------------------------------------------------------- the evaluation CLI reaches both

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    tokenizer = train_tokenizer(["there is cardiomegaly. ", "no pneumothorax. ", "the lung is clear. "], vocab_size=100)
    model = MaCo(MaCoConfig.preset("tiny", vocab_size=tokenizer.get_vocab_size()))
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    torch.save({"model": model.state_dict(), "model_config": dataclasses.asdict(model.cfg),
                "tokenizer": tokenizer.to_str()}, path)
    return path


def test_eval_cli_image_dir_and_frontal_only_flags_reach_the_loaders(tmp_path, tiny_checkpoint, capsys):
    def evaluate(*argv):
        out = tmp_path / "out"
        assert ez.main(["--ckpt", str(tiny_checkpoint), "--out", str(out), "--n-boot", "5", *argv]) == 0
        return json.loads((out / "metrics.json").read_text())["zero_shot"]["n_images"], capsys.readouterr().out

    make_nih_download(tmp_path / "nih", "kaggle")
    n_images, out = evaluate("--data", "nih", "--root", str(tmp_path / "nih"), "--image-dir", "images_001")
    assert n_images == 2 and "2 of 13 listed images found in images_001/images/" in out
    make_chexpert(tmp_path / "chexpert")
    n_images, out = evaluate("--data", "chexpert", "--root", str(tmp_path / "chexpert"), "--split", "train")
    assert n_images == 2 and "dropped 1 lateral" in out
    assert evaluate("--data", "chexpert", "--root", str(tmp_path / "chexpert"), "--split", "train",
                    "--no-frontal-only")[0] == 3


# ----------------------------------------------------------------------------- numbered impressions (D6)

OPENI_NUMBERED = "1. No acute cardiopulmonary abnormality. 2. Stable calcified granuloma in the right upper lobe."
FIRST, SECOND = "1. no acute cardiopulmonary abnormality. ", "2. stable calcified granuloma in the right upper lobe. "
NUMBERED_CAPTIONS = {FIRST, SECOND, FIRST + SECOND, SECOND + FIRST}  # every non-empty subset, in either order


def test_a_list_number_stays_with_the_sentence_that_follows():
    pieces = data.split_sentences(OPENI_NUMBERED)
    assert pieces == ["1. No acute cardiopulmonary abnormality", " 2. Stable calcified granuloma in the right upper "
                      "lobe", ""]
    assert ".".join(pieces) == OPENI_NUMBERED  # still a partition of the text at its sentence breaks
    assert data.split_sentences("Nodule of 1.5 cm. 10. Stable.") == ["Nodule of 1.5 cm", " 10. Stable", ""]
    assert data.report_sentences("Heart size normal. 3.") == ["Heart size normal"]  # a stray number is no sentence


def test_no_caption_of_a_numbered_impression_is_a_number_alone():
    generator = torch.Generator().manual_seed(0)
    captions = collections.Counter(data.report_to_caption(OPENI_NUMBERED, generator) for _ in range(200))
    assert set(captions) == NUMBERED_CAPTIONS  # before: "1. " alone, "2. " alone, numbers between sentences


def test_numbered_mimic_impression_lines_give_one_sentence_per_item():
    text = mimic_report("Heart size is normal.", "1. Mild pulmonary edema.\n2. Small left pleural effusion measuring "
                        "1.5 cm.\n3. No pneumothorax.", None)
    assert data.report_sentences(data.compose_report(data.parse_report_sections(text))) == [
        "Heart size is normal", "1. Mild pulmonary edema", "2. Small left pleural effusion measuring 1.5 cm",
        "3. No pneumothorax"]


def test_labeler_negates_only_the_numbered_item_that_holds_the_negation():
    report = " FINDINGS: \n \n Heart size is normal.\n \n IMPRESSION: \n \n 1. No pneumothorax.\n 2. Small left " \
             "pleural effusion.\n 3. Possible mild edema.\n"
    labels = label_report(report)
    assert (labels["Pneumothorax"], labels["Pleural Effusion"], labels["Edema"]) == ("0.0", "1.0", "-1.0")


def write_openi_report(root, uid: int, findings, impression, image_ids):
    """One ecgen-radiology/<uid>.xml in the real format (test_data.OPENI_XML) and its PNGs."""
    def section(label, text):
        return f'<AbstractText Label="{label}">{text}</AbstractText>' if text else f'<AbstractText Label="{label}"/>'
    images = "\n   ".join(f'<parentImage id="{image_id}">\n      <figureId>F1</figureId>\n   </parentImage>'
                           for image_id in image_ids)
    write_text(root / "ecgen-radiology" / f"{uid}.xml", OPENI_XML.format(
        uid=uid, findings=section("FINDINGS", findings), impression=section("IMPRESSION", impression), images=images))
    for image_id in image_ids:
        write_image(root / f"{image_id}.png", (16, 20))


def test_openi_numbered_impression_captions_keep_their_numbers_with_their_sentences(tmp_path):
    write_openi_report(tmp_path, 5, None, OPENI_NUMBERED, ["CXR5_IM-2117-1003002"])
    dataset = data.OpenI(tmp_path, image_size=16, augment=True, seed=0)
    assert dataset.report_texts() == ["1. no acute cardiopulmonary abnormality. 2. stable calcified granuloma in the "
                                      "right upper lobe. "]
    captions = set()
    for epoch in range(40):
        dataset.set_epoch(epoch)
        captions.add(dataset[0]["caption"])
    assert captions == NUMBERED_CAPTIONS


# ----------------------------------------------------------------------------- Open-i views (§7.3)

def test_openi_views_csv_keeps_the_pa_images_and_says_how_many(tmp_path, capsys):
    make_openi(tmp_path)
    model_cfg = MaCoConfig.preset("tiny")
    every = train.build_dataset(train.TrainConfig(data="openi", root=str(tmp_path)), model_cfg, True)
    assert len(every) == 3 and len(every.reports) == 3  # 3 non-empty reports, one of them without images
    assert "3 images of 3 reports (all views, laterals included: pass nlmcxr_tsne_pa.csv.gz" in capsys.readouterr().out
    cfg = train.TrainConfig(data="openi", root=str(tmp_path), views_csv=str(tmp_path / "nlmcxr_tsne_pa.csv.gz"))
    frontal = train.build_dataset(cfg, model_cfg, True)
    assert [item[0] for item in frontal.items] == ["CXR1_1_IM-0001-3001", "CXR2_IM-0652-1001"]
    assert "the views file kept 2 PA of 3" in capsys.readouterr().out


def test_openi_views_csv_naming_no_image_and_views_csv_without_openi_are_errors(tmp_path, capsys):
    make_openi(tmp_path)
    write_text(tmp_path / "other.csv", "imageid,tsne-view\nCXR9_IM-0001-1001,PA\n")
    with pytest.raises(ValueError, match=r"other\.csv names none of the 3 images of the reports as PA"):
        data.OpenI(tmp_path, image_size=16, views_csv=tmp_path / "other.csv")
    assert train.main(["--views-csv", str(tmp_path / "other.csv"), "--out-dir", str(tmp_path / "run")]) == 2
    assert "--views-csv names the views of Open-i images; --data synthetic does not use it" in capsys.readouterr().err


def test_train_cli_pretrains_on_the_pa_images_of_the_views_csv(tmp_path, capsys):
    make_openi(tmp_path / "openi")
    views = tmp_path / "openi" / "nlmcxr_tsne_pa.csv.gz"
    argv = ["--data", "openi", "--root", str(tmp_path / "openi"), "--views-csv", str(views), "--preset", "tiny",
            "--epochs", "1", "--batch-size", "2", "--num-workers", "0", "--out-dir", str(tmp_path / "run")]
    assert train.main(argv) == 0
    assert "on 2 openi pairs" in capsys.readouterr().out
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["train_config"]
    assert saved["views_csv"] == str(views) and parse_config(train.TrainConfig, argv).views_csv == str(views)
