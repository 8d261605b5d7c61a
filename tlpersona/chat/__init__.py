"""Floor 1: chat templates (spans of a rendered conversation) and the position grammar over
them."""
