"""Dataclasses and objects without a JSON form: an inventory with restocking."""

from dataclasses import dataclass, field


@dataclass
class Item:
  name: str
  quantity: int
  price: float


@dataclass
class Inventory:
  items: dict = field(default_factory=dict)

  def add(self, name, quantity, price):
    item = self.items.get(name)
    if item is None:
      self.items[name] = Item(name, quantity, price)
    else:
      item.quantity += quantity

  def total_value(self):
    return round(sum(i.quantity * i.price for i in self.items.values()), 2)


def restock(orders):
  inventory = Inventory()
  for name, quantity, price in orders:
    inventory.add(name, quantity, price)
  low = {name for name, item in inventory.items.items() if item.quantity < 5}
  return inventory.total_value(), low


INPUTS = {
  "restock": [([("apple", 3, 0.5), ("pear", 10, 0.75), ("apple", 1, 0.5)],)],
}
