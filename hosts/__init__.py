"""Plugin host processes (isolation = "process" | "sandbox"); lands with the [hosts] issue."""
