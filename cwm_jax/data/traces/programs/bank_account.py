"""Classes: state in attributes, methods calling methods, inheritance and super()."""


class InsufficientFunds(Exception):
  pass


class Account:
  def __init__(self, owner, balance=0):
    self.owner = owner
    self.balance = balance
    self.history = []

  def deposit(self, amount):
    self.balance += amount
    self.history.append(("deposit", amount))

  def withdraw(self, amount):
    if amount > self.balance:
      raise InsufficientFunds(f"{self.owner} has only {self.balance}")
    self.balance -= amount
    self.history.append(("withdraw", amount))

  def __repr__(self):
    return f"Account({self.owner!r}, {self.balance})"


class SavingsAccount(Account):
  def __init__(self, owner, balance=0, rate=0.1):
    super().__init__(owner, balance)
    self.rate = rate

  def add_interest(self):
    interest = round(self.balance * self.rate, 2)
    self.deposit(interest)
    return interest


def simulate(operations):
  account = SavingsAccount("ada", 100)
  failures = 0
  for op, amount in operations:
    try:
      if op == "in":
        account.deposit(amount)
      else:
        account.withdraw(amount)
    except InsufficientFunds:
      failures += 1
  account.add_interest()
  return account, failures


INPUTS = {
  "simulate": [([("in", 50), ("out", 500), ("out", 30)],)],
}
