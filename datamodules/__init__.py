"""Task DataModules for lightning-sofo: one file per task family (filled by the zoo issue)."""
