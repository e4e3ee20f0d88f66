"""The embedded engine: template, state machine and handlers on one machine, over moto."""
