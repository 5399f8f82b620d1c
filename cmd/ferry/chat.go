package main

import (
	"context"
	"errors"
	"io"

	"github.com/ferryhq/ferry/client"
)

func cmdChat(ctx context.Context, c *client.Client, args []string, stdin io.Reader, out io.Writer) error {
	return errors.New("todo")
}
