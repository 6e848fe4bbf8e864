"""caption-rules: the caption rules data teams write in Python, as a sandboxed ladle plugin.

A record is kept when its caption (the `field` of the config, default "caption"):
- has at least `min_words` words (default 3; words are split on whitespace, in any script);
- is at least `min_alpha` letters (default 0.5: the share of characters that are letters, in any
  script, out of all characters but whitespace);
- holds none of the `banned` substrings (default none; compared case-insensitively).
A record without the field, or whose field is not text, is dropped. Kept records are unchanged.

    [stages.rules]
    kind = "plugin"
    data = "captions"
    wasm = "plugins/examples/python/caption-rules/caption_rules.wasm"
    config = { min_words = 4, min_alpha = 0.6, banned = ["click here", "stock photo"] }
"""

import ladle_plugin


@ladle_plugin.configure
def check(config):
    if config.get("min_words", 3) < 0:
        raise ValueError("min_words must be 0 or more")
    if not 0 <= config.get("min_alpha", 0.5) <= 1:
        raise ValueError("min_alpha is a share of the characters: between 0 and 1")


@ladle_plugin.filter
def keep(record, config):
    caption = record.get(config.get("field", "caption"))
    if not isinstance(caption, str):
        return False
    if len(caption.split()) < config.get("min_words", 3):
        return False
    visible = [c for c in caption if not c.isspace()]
    letters = sum(c.isalpha() for c in visible)
    if not visible or letters / len(visible) < config.get("min_alpha", 0.5):
        return False
    lowered = caption.lower()
    return not any(banned.lower() in lowered for banned in config.get("banned", []))


Filter = ladle_plugin.Filter
