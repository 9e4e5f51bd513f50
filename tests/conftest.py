import os

# Every test process sees 8 host CPU devices, so sharding tests run on one CPU.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
