"""Plate folders in natural order."""

from plateflow.corpus import plate_folders

from fixtures.plates import make_plate, paper_plate


def test_plate_folders_sort_naturally(tmp_path):
    from plateflow.layout import natural_key

    for name in ("plate-1000", "plate-101", "plate-2", "plate-10"):
        make_plate(tmp_path, name, paper_plate())
    assert [p.name for p in plate_folders(tmp_path)] == ["plate-2", "plate-10", "plate-101", "plate-1000"]
    assert sorted(["b10", "b9", "a100"], key=natural_key) == ["a100", "b9", "b10"]
