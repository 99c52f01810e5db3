"""What a segment is, as DICOM codes: SNOMED CT category, type and region from a free-text name.

One table for every front end: DICOM SEG export (:mod:`.dicom_seg`) and the Slicer segment
terminology (:mod:`SPASegmentationLib.scene.segments`) both read it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from pydicom.sr.coding import Code

# CID 7150 segmentation property categories (SNOMED CT).
TISSUE = Code("85756007", "SCT", "Tissue")
ANATOMICAL_STRUCTURE = Code("91723000", "SCT", "Anatomical Structure")
ABNORMAL_STRUCTURE = Code("49755003", "SCT", "Morphologically Abnormal Structure")

# Organ / region words → SNOMED CT property type (category: anatomical structure).
ANATOMY: dict[str, Code] = {
    "liver": Code("10200004", "SCT", "Liver"),
    "kidney": Code("64033007", "SCT", "Kidney"),
    "spleen": Code("78961009", "SCT", "Spleen"),
    "pancreas": Code("15776009", "SCT", "Pancreas"),
    "lung": Code("39607008", "SCT", "Lung"),
    "heart": Code("80891009", "SCT", "Heart"),
    "brain": Code("12738006", "SCT", "Brain"),
    "prostate": Code("41216001", "SCT", "Prostate"),
    "bladder": Code("89837001", "SCT", "Bladder"),
    "gallbladder": Code("28231008", "SCT", "Gallbladder"),
    "stomach": Code("69695003", "SCT", "Stomach"),
    "aorta": Code("15825003", "SCT", "Aorta"),
    "thyroid": Code("69748006", "SCT", "Thyroid"),
    "breast": Code("76752008", "SCT", "Breast"),
    "bone": Code("272673000", "SCT", "Bone"),
    "vertebra": Code("51282000", "SCT", "Vertebra"),
    "muscle": Code("71616004", "SCT", "Muscle"),
    "esophagus": Code("32849002", "SCT", "Esophagus"),
    "oesophagus": Code("32849002", "SCT", "Esophagus"),
    "colon": Code("71854001", "SCT", "Colon"),
    "rectum": Code("34402009", "SCT", "Rectum"),
    "uterus": Code("35039007", "SCT", "Uterus"),
    "trachea": Code("44567001", "SCT", "Trachea"),
    "lymph node": Code("59441001", "SCT", "Lymph Node"),
    "spinal cord": Code("2748008", "SCT", "Spinal cord"),
    "adrenal": Code("23451007", "SCT", "Adrenal gland"),
}

# Abnormality words → SNOMED CT property type (category: morphologically abnormal structure).
ABNORMALITY: dict[str, Code] = {
    "tumour": Code("108369006", "SCT", "Neoplasm"),
    "tumor": Code("108369006", "SCT", "Neoplasm"),
    "neoplasm": Code("108369006", "SCT", "Neoplasm"),
    "cancer": Code("108369006", "SCT", "Neoplasm"),
    "metastasis": Code("128462008", "SCT", "Metastasis"),
    "lesion": Code("52988006", "SCT", "Lesion"),
    "nodule": Code("27925004", "SCT", "Nodule"),
    "mass": Code("4147007", "SCT", "Mass"),
    "cyst": Code("367643001", "SCT", "Cyst"),
}


@dataclass(frozen=True)
class Terminology:
    """What a segment is, as DICOM codes: category, type and optionally the region it lies in."""

    category: Code
    type: Code
    region: Code | None = None


def _words(text: str) -> str:
    """Lower-case ``text`` with non-letters as single spaces, padded, for whole-word matching."""
    return " " + re.sub(r"[^a-z]+", " ", text.lower()).strip() + " "


def _find(words: str, table: Mapping[str, Code]) -> Code | None:
    """The code of the first table entry (longest name first) that occurs as whole words."""
    for name in sorted(table, key=len, reverse=True):
        if f" {name} " in words or f" {name}s " in words:
            return table[name]
    return None


def terminology_for(structure: str | Terminology | None) -> Terminology:
    """SNOMED CT codes for a free-text structure name such as "liver", "liver tumour" or "nodule".

    An abnormality word (tumour, lesion, nodule, mass, cyst, metastasis…) wins and the organ, if
    named too, becomes the anatomic region; an organ word alone gives an anatomical structure;
    anything else (or None) is generic tissue (category and type "Tissue").
    """
    if isinstance(structure, Terminology):
        return structure
    if not structure:
        return Terminology(TISSUE, TISSUE)
    words = _words(structure)
    organ = _find(words, ANATOMY)
    abnormal = _find(words, ABNORMALITY)
    if abnormal is not None:
        return Terminology(ABNORMAL_STRUCTURE, abnormal, region=organ)
    if organ is not None:
        return Terminology(ANATOMICAL_STRUCTURE, organ)
    return Terminology(TISSUE, TISSUE)
