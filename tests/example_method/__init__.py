"""The example method: P2-weighted v-prediction DDPM, the smallest package that follows the method
contract (WORKSPACE.md, "Adding a method"). ``config.method = "tests.example_method"``."""
