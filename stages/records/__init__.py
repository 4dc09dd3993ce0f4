"""What a build leaves for people and CI: the manifest, junit.xml, reproducibility notes."""
