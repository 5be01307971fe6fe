"""Class splits (VOC / non-VOC), dataset registration, the embedded synthetic dataset."""
