"""Building blocks that methods compose: mode discovery (clustering), memories, group sampling."""
