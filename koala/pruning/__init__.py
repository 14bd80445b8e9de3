"""Choosing a student by measurement: the teacher's sensitivity to each removable unit, and a spec at a budget.

`surgery` runs the teacher as an inherited student (its own modules re-listed, no copy), `moves` lists the single
spec edits a student can make and their exact cost, `sensitivity` measures output and feature errors on a
calibration set (`units`: the rows of its table), `greedy` picks a spec at a parameter or FLOP budget (`comfyui`:
within a layout ComfyUI detects), `report` writes the table, the heat map and the
spec's YAML. The command is `python -m koala.search` (koala/search.py).
"""
