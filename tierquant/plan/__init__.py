"""Which tensors form which tier, at which precision: recipes and their rules, the plan
files, measured allocation to a budget (the knapsack, the budgets, the memory model),
and the predicted size of a plan."""
