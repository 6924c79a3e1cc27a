"""Domain: task states and their transitions, records, errors."""
