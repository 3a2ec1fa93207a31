/// The image transform of the official PEA training scripts, on a PIL image that is already RGB:
///
///     transforms.Compose([transforms.Resize(resolution, interpolation=BILINEAR),
///                         transforms.CenterCrop(resolution), transforms.ToTensor(),
///                         transforms.Normalize([0.5], [0.5])])
///
/// reproduced step by step so the result equals torchvision's (torchvision 0.2x with Pillow ≥ 7):
/// - `Resize(r)`: the shorter side becomes r, the longer `Int(r · long / short)` (Python's `int(r * long /
///   short)`: a correctly rounded division, then truncation); an image already of that size is kept as is.
///   The resampling is Pillow's `Image.resize(size, BILINEAR)` (`ImageResampling`): a separable triangle
///   filter whose support grows with the reduction factor (antialiased), two passes in 8-bit fixed point with
///   22 fractional bits, the intermediate image rounded and clipped to 8 bits — so the result is bit-exact,
///   not merely close.
/// - `CenterCrop(r)`: top = `int(round((h − r) / 2.0))`, left likewise, with Python's `round`, which rounds
///   halves to even.
/// - `ToTensor` + `Normalize`: x/255 in float32, then (x − 0.5)/0.5 in float32, channels first.
public enum TrainingImageTransform {
    /// The whole transform: a [3, resolution, resolution] f32 tensor in [-1, 1], channels R, G, B.
    public static func tensor(from image: RGBImage, resolution: Int) -> HostTensor {
        precondition(resolution > 0, "resolution must be positive")
        let resized = resizeShorterSide(image, to: resolution)
        return normalizedTensor(centerCrop(resized, size: resolution))
    }

    /// torchvision's `Resize(size)` for a single int: shorter side to `size`, aspect ratio kept (long side
    /// truncated as torchvision computes it), Pillow's antialiased bilinear filter.
    public static func resizeShorterSide(_ image: RGBImage, to size: Int) -> RGBImage {
        let (width, height) = resizedSize(width: image.width, height: image.height, shorterSide: size)
        if width == image.width && height == image.height { return image }
        return resize(image, width: width, height: height)
    }

    /// The output size of torchvision's `Resize(shorterSide)`: (width, height).
    public static func resizedSize(width: Int, height: Int, shorterSide size: Int) -> (width: Int, height: Int) {
        let (short, long) = width <= height ? (width, height) : (height, width)
        // Python: int(size * long / short) — the exact integer product, one correctly rounded division.
        let newLong = Int(Double(size * long) / Double(short))
        return width <= height ? (size, newLong) : (newLong, size)
    }

    /// Pillow's `Image.resize((width, height), Image.BILINEAR)` of an RGB image (reducing_gap None).
    public static func resize(_ image: RGBImage, width: Int, height: Int) -> RGBImage {
        ImageResampling.resize(image, width: width, height: height, filter: .bilinear)
    }

    /// torchvision's `CenterCrop(size)` for an image at least `size` in both directions.
    public static func centerCrop(_ image: RGBImage, size: Int) -> RGBImage {
        precondition(image.width >= size && image.height >= size,
                     "center crop of \(size) from a \(image.width)×\(image.height) image")
        return crop(image, top: cropOffset(image.height, size), left: cropOffset(image.width, size), width: size, height: size)
    }

    /// `int(round((length - size) / 2.0))` with Python's round-half-to-even.
    static func cropOffset(_ length: Int, _ size: Int) -> Int {
        Int((Double(length - size) / 2.0).rounded(.toNearestOrEven))
    }

    /// `Normalize([0.5], [0.5])(ToTensor()(image))`: [3, height, width] f32, each value (x/255 − 0.5)/0.5
    /// computed in float32 as torch does.
    public static func normalizedTensor(_ image: RGBImage) -> HostTensor {
        let plane = image.width * image.height
        var values = [Float](repeating: 0, count: 3 * plane)
        var table = [Float](repeating: 0, count: 256)
        for value in 0..<256 { table[value] = (Float(value) / 255 - 0.5) / 0.5 }
        image.pixels.withUnsafeBufferPointer { source in
            values.withUnsafeMutableBufferPointer { out in
                for index in 0..<plane {
                    out[index] = table[Int(source[3 * index])]
                    out[plane + index] = table[Int(source[3 * index + 1])]
                    out[2 * plane + index] = table[Int(source[3 * index + 2])]
                }
            }
        }
        return HostTensor(values, shape: [3, image.height, image.width])
    }
}
