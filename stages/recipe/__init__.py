"""What a recipe may say: the schema (`schema`), loading YAML with `extends:` and overrides (`load`), and the checks
made before any task runs (`target_checks`, `checkpoint_checks`, `fit`, `prompts`). Stage code never imports this
package at run time: a recipe reaches a stage as settings, through its `from_recipe`, and enters keys as data.
"""
