"""Real components and doubles the tests start on 127.0.0.1: Azurite, the ARM double, disk images."""
