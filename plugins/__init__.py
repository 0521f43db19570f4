"""DeepSeek-V3 innovations as Lightning plugins; the core never imports this package."""
