"""Files the grader runs inside the task's interpreter (stdlib and pytest only, no project imports).

``swe_rl_pytest.py`` starts pytest so the repository cannot stand in for it;
``swe_rl_outcomes.py`` is the pytest plugin that reports each test's outcome to the
grader through a file the test output never reaches. ``reward.test_run`` copies both
into a directory outside the repository copy for every run.
"""
