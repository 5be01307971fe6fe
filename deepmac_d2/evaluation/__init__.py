"""COCO evaluation restricted to class subsets."""
