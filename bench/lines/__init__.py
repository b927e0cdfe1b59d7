"""Lines the kit's base never saw, for ``bench/new_line.py``.

Each generator draws its own surface (scikit-image's bundled photographs, or numpy/OpenCV procedures written here)
and its own defects, and writes them in one of the label formats ``defectkit data import`` reads, with the user's
own train/val split. Nothing here imports or copies the kit's synthetic generators (``detect/data/``): the point
is a line the pretrain corpus shares no code or texture with. These modules run in the bench's own venv
(numpy, OpenCV, scikit-image), not the kit's.
"""
