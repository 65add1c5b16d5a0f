from jaxpar.envs.coin_game.coin_game import CoinGame, CoinGameState

__all__ = ["CoinGame", "CoinGameState"]
